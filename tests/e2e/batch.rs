//! BatchSandbox and Pool behaviour against the real control plane, with a real controller process:
//! the spec's scenarios, concurrency, crash recovery and lost pods.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use sandbox_domain::api::names;

use crate::controller::{endpoints, ledger};
use crate::fixtures;
use crate::harness::{env, spec_manifest, with_future_expire};

const T: Duration = Duration::from_secs(60);

fn pooled_batch_yaml(name: &str, pool: &str, replicas: i32) -> String {
    format!(
        r#"apiVersion: sandbox.opensandbox.io/v1alpha1
kind: BatchSandbox
metadata:
  name: {name}
spec:
  replicas: {replicas}
  poolRef: {pool}
"#
    )
}

async fn wait_pool(
    env: &crate::harness::TestEnv,
    name: &str,
    total: i32,
    allocated: i32,
    available: i32,
) {
    env.wait_for(
        &format!("Pool {name} total={total} allocated={allocated} available={available}"),
        T,
        || async {
            let s = env
                .pool(name)
                .await
                .and_then(|p| p.status)
                .map(|s| (s.total, s.allocated, s.available));
            if s == Some((total, allocated, available)) {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_batch_creates_scales_and_deletes_its_pods() {
    let env = env("basic-batch").await;
    let _controller = env.start_controller(&[]);
    env.apply(&spec_manifest("basic-batch"));
    let batch = env.wait_batch_ready("basic-batch-sandbox", 5, T).await;

    let selector = format!("{}=basic-batch-sandbox", names::LABEL_BATCH_NAME);
    let mut pods: Vec<String> = env
        .live_pods(&selector)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    pods.sort();
    assert_eq!(
        pods,
        (0..5)
            .map(|i| format!("basic-batch-sandbox-{i}"))
            .collect::<Vec<_>>()
    );
    let eps = endpoints(&batch);
    assert_eq!(
        eps.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["0", "1", "2", "3", "4"]
    );
    assert!(
        eps.iter().all(|(_, ip)| ip.starts_with("127.1.")),
        "{eps:?}"
    );
    let ready = batch
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AllSandboxesReady")
    );

    env.kubectl_ok(&[
        "patch",
        "batchsandbox",
        "basic-batch-sandbox",
        "-p",
        r#"{"spec":{"replicas":7}}"#,
        "--type=merge",
    ]);
    env.wait_batch_ready("basic-batch-sandbox", 7, T).await;
    env.kubectl_ok(&[
        "scale",
        "batchsandbox",
        "basic-batch-sandbox",
        "--replicas=2",
    ]);
    env.wait_batch_ready("basic-batch-sandbox", 2, T).await;
    env.wait_for("scale-down to remove the highest indices", T, || async {
        let mut names: Vec<String> = env
            .live_pods(&selector)
            .await
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        names.sort();
        names == ["basic-batch-sandbox-0", "basic-batch-sandbox-1"]
    })
    .await;

    // A pod deleted by hand comes back under the same index.
    env.kubectl_ok(&["delete", "pod", "basic-batch-sandbox-1", "--wait=false"]);
    env.wait_batch_ready("basic-batch-sandbox", 2, T).await;

    env.kubectl_ok(&[
        "delete",
        "batchsandbox",
        "basic-batch-sandbox",
        "--wait=false",
    ]);
    env.wait_for("the batch and its pods to be gone", T, || async {
        env.batch("basic-batch-sandbox").await.is_none()
            && env.live_pods(&selector).await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_warms_and_pooled_batch_allocates_scales_and_releases() {
    let env = env("pooled-batch").await;
    let _controller = env.start_controller(&[]);
    env.apply(&spec_manifest("pool"));
    // poolMin 10 with no demand: 10 idle pods.
    wait_pool(&env, "fast-pool", 10, 0, 10).await;

    env.apply(&with_future_expire(&spec_manifest("pooled-batch")));
    let batch = env.wait_batch_ready("pooled-batch-sandbox", 10, T).await;
    let held = ledger(&batch);
    assert_eq!(held.len(), 10);
    assert_eq!(
        held.iter().collect::<HashSet<_>>().len(),
        10,
        "distinct pods"
    );
    // Endpoints list each held pod's IP in shard order.
    let pods = env
        .live_pods(&format!("{}=fast-pool", names::LABEL_POOL_NAME))
        .await;
    let ip_of = |name: &str| {
        pods.iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .and_then(|p| p.status.as_ref()?.pod_ip.clone())
    };
    let eps = endpoints(&batch);
    for (i, pod) in held.iter().enumerate() {
        assert_eq!(eps[i], (i.to_string(), ip_of(pod).expect("pod ip")));
    }
    // The buffer refills: 10 allocated + bufferMin 5 idle.
    wait_pool(&env, "fast-pool", 15, 10, 5).await;

    env.kubectl_ok(&[
        "patch",
        "batchsandbox",
        "pooled-batch-sandbox",
        "-p",
        r#"{"spec":{"replicas":20}}"#,
        "--type=merge",
    ]);
    let grown = env.wait_batch_ready("pooled-batch-sandbox", 20, T).await;
    assert_eq!(
        ledger(&grown)[..10],
        held[..],
        "existing shards keep their pods"
    );
    wait_pool(&env, "fast-pool", 25, 20, 5).await;

    env.kubectl_ok(&[
        "patch",
        "batchsandbox",
        "pooled-batch-sandbox",
        "-p",
        r#"{"spec":{"replicas":5}}"#,
        "--type=merge",
    ]);
    let shrunk = env.wait_batch_ready("pooled-batch-sandbox", 5, T).await;
    assert_eq!(
        ledger(&shrunk)[..],
        held[..5],
        "scale-down releases the highest shards"
    );
    // Released pods are deleted (recycle strategy Delete) and the pool settles at poolMin.
    wait_pool(&env, "fast-pool", 10, 5, 5).await;

    // Deleting the batch returns its pods; the pool refills to poolMin with idle pods.
    env.kubectl_ok(&[
        "delete",
        "batchsandbox",
        "pooled-batch-sandbox",
        "--wait=false",
    ]);
    wait_pool(&env, "fast-pool", 10, 0, 10).await;
    assert!(env.batch("pooled-batch-sandbox").await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn expiring_batch_is_deleted_at_expire_time_and_its_pods_return() {
    let env = env("expiring-batch").await;
    let _controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("fast-pool", [2, 10, 5, 20]).yaml());
    wait_pool(&env, "fast-pool", 5, 0, 5).await;

    let expire_at =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(4);
    let expire_text = expire_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    env.apply(&spec_manifest("expiring-batch").replace("2026-03-02T12:00:00Z", &expire_text));
    env.wait_batch_ready("expiring-batch", 3, T).await;
    env.wait_for("the expired batch to be deleted", T, || async {
        env.batch("expiring-batch").await.is_none()
    })
    .await;
    let late = k8s_openapi::jiff::Timestamp::now().duration_since(
        expire_at
            .round(k8s_openapi::jiff::Unit::Second)
            .expect("round"),
    );
    assert!(
        late < k8s_openapi::jiff::SignedDuration::from_secs(10),
        "deleted {late:?} after expireTime"
    );
    wait_pool(&env, "fast-pool", 5, 0, 5).await;
    let events = env.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=Expired",
        "-o",
        "name",
    ]);
    assert!(!events.trim().is_empty(), "an Expired event is recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_pool_waits_for_allocated_pods_to_be_released() {
    let env = env("delete-pool").await;
    let _controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("fast-pool", [2, 5, 4, 10]).yaml());
    wait_pool(&env, "fast-pool", 4, 0, 4).await;
    env.apply(&pooled_batch_yaml("holder", "fast-pool", 2));
    let batch = env.wait_batch_ready("holder", 2, T).await;
    let held: HashSet<String> = ledger(&batch).into_iter().collect();

    env.kubectl_ok(&["delete", "pool", "fast-pool", "--wait=false"]);
    let selector = format!("{}=fast-pool", names::LABEL_POOL_NAME);
    env.wait_for("idle pods deleted, allocated pods kept", T, || async {
        let live: HashSet<String> = env
            .live_pods(&selector)
            .await
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        if live == held {
            Ok(())
        } else {
            Err(format!("live {live:?}, held {held:?}"))
        }
    })
    .await;
    // The pool waits for its allocated pods, and says so.
    let terminating = env
        .wait_for("the Pool's Terminating condition", T, || async {
            let conditions = env.pool("fast-pool").await?.status?.conditions;
            conditions.into_iter().find(|c| c.type_ == "Terminating")
        })
        .await;
    assert!(
        terminating.message.contains("holder"),
        "{}",
        terminating.message
    );
    env.wait_for("the batch to report its pool unavailable", T, || async {
        let conditions = env.batch("holder").await?.status?.conditions;
        conditions.into_iter().find(|c| {
            c.type_ == "PoolUnavailable" && c.status == "True" && c.reason == "PoolTerminating"
        })
    })
    .await;

    env.kubectl_ok(&["delete", "batchsandbox", "holder", "--wait=false"]);
    env.wait_for("the pool and all its pods to be gone", T, || async {
        env.pool("fast-pool").await.is_none() && env.live_pods(&selector).await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_pool_and_pool_at_pool_max_show_conditions() {
    let env = env("pool-conditions").await;
    let _controller = env.start_controller(&[]);
    env.apply(&pooled_batch_yaml("orphan", "no-such-pool", 1));
    env.wait_for("PoolUnavailable=True (PoolNotFound)", T, || async {
        let conditions = env.batch("orphan").await?.status?.conditions;
        conditions.into_iter().find(|c| {
            c.type_ == "PoolUnavailable" && c.status == "True" && c.reason == "PoolNotFound"
        })
    })
    .await;

    env.apply(&fixtures::pool("small", [0, 2, 0, 2]).yaml());
    env.apply(&pooled_batch_yaml("big", "small", 3));
    let pending = env
        .wait_for("PoolAllocationPending=True", T, || async {
            let batch = env.batch("big").await?;
            let status = batch.status?;
            (status.allocated == 2).then_some(())?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "PoolAllocationPending" && c.status == "True")
        })
        .await;
    assert_eq!(pending.reason, "PoolCapacityExhausted");
    assert!(
        pending.message.contains("poolMax (2)"),
        "the message names poolMax: {}",
        pending.message
    );
    // Capacity frees up: the condition clears and the batch completes.
    env.kubectl_ok(&[
        "patch",
        "pool",
        "small",
        "-p",
        r#"{"spec":{"capacitySpec":{"poolMax":4}}}"#,
        "--type=merge",
    ]);
    let batch = env.wait_batch_ready("big", 3, T).await;
    let pending = batch
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "PoolAllocationPending")
        .unwrap();
    assert_eq!(pending.status, "False");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_claims_get_distinct_pods() {
    let env = env("concurrent-claims").await;
    let _controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("shared", [10, 60, 50, 100]).yaml());
    env.wait_for("50 idle pods", T, || async {
        env.pool("shared")
            .await
            .and_then(|p| p.status)
            .is_some_and(|s| s.available >= 50)
    })
    .await;

    let applies = (0..50).map(|i| {
        let yaml = pooled_batch_yaml(&format!("claim-{i}"), "shared", 1);
        let env = &env;
        async move { tokio::task::block_in_place(|| env.apply(&yaml)) }
    });
    join_all(applies).await;

    let mut all = Vec::new();
    for i in 0..50 {
        let batch = env.wait_batch_ready(&format!("claim-{i}"), 1, T).await;
        all.extend(ledger(&batch));
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 50);
    assert_eq!(distinct.len(), 50, "a pod was allocated twice: {all:?}");
    env.wait_for("pool to count 50 allocated", T, || async {
        env.pool("shared")
            .await
            .and_then(|p| p.status)
            .is_some_and(|s| s.allocated == 50)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_controller_mid_allocation_loses_and_doubles_nothing() {
    let env = env("controller-crash").await;
    let mut controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("crashy", [5, 40, 30, 80]).yaml());
    env.wait_for("30 idle pods", T, || async {
        env.pool("crashy")
            .await
            .and_then(|p| p.status)
            .is_some_and(|s| s.available >= 30)
    })
    .await;

    // Claims arrive while the controller is allocating; it dies (SIGKILL) as soon as the first
    // allocation lands, with the rest of the claims still arriving.
    let yaml: String = (0..40)
        .map(|i| pooled_batch_yaml(&format!("c-{i}"), "crashy", 1) + "---\n")
        .collect();
    let applier = {
        let (kubeconfig, ns) = (env.kubeconfig.clone(), env.ns.clone());
        std::thread::spawn(move || {
            for chunk in yaml
                .split("---\n")
                .filter(|d| !d.trim().is_empty())
                .collect::<Vec<_>>()
                .chunks(4)
            {
                let mut child = std::process::Command::new("kubectl")
                    .env("KUBECONFIG", &kubeconfig)
                    .args(["-n", &ns, "apply", "-f", "-"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("kubectl");
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(chunk.join("---\n").as_bytes())
                    .expect("write");
                assert!(child.wait().expect("kubectl").success());
            }
        })
    };
    let allocated = || async {
        let list = env.batches().list(&Default::default()).await.expect("list");
        list.items.iter().map(|b| ledger(b).len()).sum::<usize>()
    };
    env.wait_for("the first allocation", T, || async {
        allocated().await > 0
    })
    .await;
    controller.kill();
    let allocated_at_kill = allocated().await;
    applier.join().expect("applying claims");
    eprintln!("{allocated_at_kill} of 40 claims were allocated when the controller was killed");
    assert!(
        allocated_at_kill < 40,
        "the kill should land mid-allocation"
    );
    controller.restart();

    let mut all = Vec::new();
    for i in 0..40 {
        let batch = env
            .wait_batch_ready(&format!("c-{i}"), 1, Duration::from_secs(90))
            .await;
        all.extend(ledger(&batch));
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(
        distinct.len(),
        40,
        "double allocation after restart: {all:?}"
    );
    // Counts converge and every pod is accounted for: 40 allocated, idle within
    // [bufferMin 5, bufferMax 40] (creations in flight at the kill may land after the restart),
    // never above poolMax, and every pod owned.
    env.wait_for("pool counts to converge", T, || async {
        let s = env
            .pool("crashy")
            .await
            .and_then(|p| p.status)
            .unwrap_or_default();
        if s.allocated == 40
            && s.pending == 0
            && (5..=40).contains(&s.available)
            && s.total == s.allocated + s.available
            && s.total <= 80
        {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let pods = env
        .live_pods(&format!("{}=crashy", names::LABEL_POOL_NAME))
        .await;
    let total = env
        .pool("crashy")
        .await
        .and_then(|p| p.status)
        .map(|s| s.total)
        .unwrap_or_default();
    assert_eq!(
        pods.len() as i32,
        total,
        "every pod is counted by the pool: none leaked"
    );
    assert!(pods.iter().all(|p| {
        p.metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| !o.is_empty())
    }));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_pod_deleted_by_hand_is_replaced() {
    let env = env("lost-pod").await;
    let _controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("p", [2, 5, 3, 10]).yaml());
    wait_pool(&env, "p", 3, 0, 3).await;
    env.apply(&pooled_batch_yaml("b", "p", 3));
    let before = ledger(&env.wait_batch_ready("b", 3, T).await);
    env.kubectl_ok(&["delete", "pod", &before[1], "--wait=false"]);
    let after = env
        .wait_for("shard 1 to get a new pod", T, || async {
            let batch = env.batch("b").await?;
            let pods = ledger(&batch);
            (pods.len() == 3 && pods[1] != before[1] && batch.status?.ready == 3).then_some(pods)
        })
        .await;
    assert_eq!(
        (&after[0], &after[2]),
        (&before[0], &before[2]),
        "other shards keep their pods"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn template_change_rolls_idle_pods_and_leaves_allocated_ones() {
    let env = env("pool-rollout").await;
    let _controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("roll", [4, 6, 6, 10]).yaml());
    wait_pool(&env, "roll", 6, 0, 6).await;
    env.apply(&pooled_batch_yaml("keep", "roll", 2));
    let held = ledger(&env.wait_batch_ready("keep", 2, T).await);
    let old_revision = env.pool("roll").await.unwrap().status.unwrap().revision;

    env.kubectl_ok(&["patch", "pool", "roll", "--type=json", "-p",
        r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"opensandbox/code-interpreter:v2"}]"#]);
    let selector = format!("{}=roll", names::LABEL_POOL_NAME);
    env.wait_for(
        "every idle pod on the new template",
        Duration::from_secs(90),
        || async {
            let pool = env.pool("roll").await?;
            let revision = pool.status?.revision;
            (revision != old_revision).then_some(())?;
            let pods = env.live_pods(&selector).await;
            let idle_old = pods.iter().filter(|p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                !held.contains(&name)
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(names::LABEL_POOL_REVISION))
                        != Some(&revision)
            });
            (idle_old.count() == 0).then_some(())
        },
    )
    .await;
    let batch = env.batch("keep").await.unwrap();
    assert_eq!(ledger(&batch), held, "allocated pods are never touched");
    let live: HashSet<String> = env
        .live_pods(&selector)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(held.iter().all(|p| live.contains(p)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_takes_over_without_double_allocation() {
    let env = env("leader-change").await;
    let lease = [
        "--leader-elect",
        "--lease-name",
        "sbx-e2e",
        "--lease-duration-seconds",
        "3",
    ];
    let ns_arg = ["--leader-election-namespace", env.ns.as_str()];
    let args: Vec<&str> = lease.iter().chain(ns_arg.iter()).copied().collect();
    let mut first = env.start_controller(&args);
    env.apply(&fixtures::pool("lp", [2, 20, 10, 40]).yaml());
    env.wait_for("10 idle pods", T, || async {
        env.pool("lp")
            .await
            .and_then(|p| p.status)
            .is_some_and(|s| s.available >= 10)
    })
    .await;
    // A follower waits on the lease while the leader serves the first claims.
    let second = env.start_controller(&args);
    let first_claims: String = (0..5)
        .map(|i| pooled_batch_yaml(&format!("a-{i}"), "lp", 1) + "---\n")
        .collect();
    env.apply(&first_claims);
    for i in 0..5 {
        env.wait_batch_ready(&format!("a-{i}"), 1, T).await;
    }
    // The follower stayed passive through all of that: not ready, not one write.
    assert_eq!(
        second.health_get("/readyz").await.0,
        503,
        "a follower is not ready"
    );
    assert_eq!(second.api_writes().await, 0, "a follower writes nothing");
    assert!(first.api_writes().await > 0, "the leader did the writing");
    first.kill();
    let second_claims: String = (0..5)
        .map(|i| pooled_batch_yaml(&format!("b-{i}"), "lp", 1) + "---\n")
        .collect();
    env.apply(&second_claims);
    let mut all = Vec::new();
    for name in (0..5)
        .map(|i| format!("a-{i}"))
        .chain((0..5).map(|i| format!("b-{i}")))
    {
        all.extend(ledger(&env.wait_batch_ready(&name, 1, T).await));
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(
        distinct.len(),
        10,
        "double allocation across the leader change: {all:?}"
    );
    assert_eq!(
        second.health_get("/readyz").await.0,
        200,
        "the new leader is ready"
    );
    assert!(
        second.api_writes().await > 0,
        "the new leader served the later claims"
    );
}

/// A leader stopped gracefully (SIGTERM, as in a rolling update) gives its Lease up once its
/// reconcilers have stopped, and the waiting replica takes it at once: the successor's
/// `acquireTime` comes before the old holder's lease would have run out (`renewTime` +
/// `leaseDurationSeconds`), with a lease long enough that waiting it out would be plain.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_stopped_gracefully_hands_its_lease_over_at_once() {
    use k8s_openapi::api::coordination::v1::Lease;
    let env = env("leader-handover").await;
    let args = [
        "--leader-elect",
        "--lease-name",
        "sbx-handover",
        "--lease-duration-seconds",
        "60",
        "--leader-election-namespace",
        env.ns.as_str(),
    ];
    let leases: kube::Api<Lease> = kube::Api::namespaced(env.client.clone(), &env.ns);
    let holder_of = |lease: &Lease| {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default()
    };
    let mut first = env.start_controller(&args);
    let first_pid = first.pid();
    let held = env
        .wait_for("the first replica to lead", T, || async {
            leases
                .get_opt("sbx-handover")
                .await
                .ok()
                .flatten()
                .filter(|l| holder_of(l).ends_with(&format!("-{first_pid}")))
        })
        .await;
    let second = env.start_controller(&args);
    env.wait_for("the second replica to wait for the lease", T, || async {
        second.log_text().contains("waiting for leadership")
    })
    .await;
    // The old holder's lease as last renewed before it stops (it renews at half its duration,
    // so this is at least 30 s ahead of the stop).
    let before = leases.get("sbx-handover").await.expect("the lease");
    let spec = before.spec.clone().expect("a lease spec");
    assert_eq!(
        holder_of(&before),
        holder_of(&held),
        "the first replica still leads"
    );
    let renewed = spec.renew_time.expect("a renew time").0;
    let lapses_at = renewed
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(
            spec.lease_duration_seconds.expect("a duration").into(),
        ))
        .expect("a time");

    assert!(
        first.terminate(Duration::from_secs(30)),
        "the leader exits cleanly on SIGTERM"
    );
    let second_pid = second.pid();
    let taken = env
        .wait_for("the second replica to take the lease", T, || async {
            leases
                .get_opt("sbx-handover")
                .await
                .ok()
                .flatten()
                .filter(|l| holder_of(l).ends_with(&format!("-{second_pid}")))
        })
        .await;
    let acquired = taken
        .spec
        .as_ref()
        .and_then(|s| s.acquire_time.clone())
        .expect("an acquire time")
        .0;
    assert!(
        acquired < lapses_at,
        "the successor acquired at {acquired}, not before the old lease lapsed at {lapses_at}: the lease was not handed over"
    );
    assert!(
        first.log_text().contains("leader lease released"),
        "the old leader released its lease: {}",
        first.log_text()
    );
    let waited = acquired.duration_since(renewed);
    eprintln!("handover: successor acquired {waited:?} after the old leader's last renewal");
}

/// The events `kubectl describe` shows: a Warning when a pooled batch cannot get pods (pool at
/// `poolMax`, pool missing), `Recycled` on the Pool when a batch gives pods back, `Expired` on an
/// expired batch; and nothing at all for a healthy claim (no event is written while it is
/// served, so claims cost no event writes).
#[tokio::test(flavor = "multi_thread")]
async fn describe_shows_failures_recycling_and_expiry_but_no_event_for_a_healthy_claim() {
    let env = env("describe-events").await;
    let controller = env.start_controller(&[]);
    let describe = |kind: &str, name: &str| env.kubectl_ok(&["describe", kind, name]);
    let events_section = |text: &str| -> String {
        text.split_once("\nEvents:")
            .map(|(_, events)| events.to_string())
            .unwrap_or_else(|| panic!("no Events section in:\n{text}"))
    };

    env.apply(&fixtures::pool("p", [1, 1, 1, 2]).yaml());
    wait_pool(&env, "p", 1, 0, 1).await;
    let writes_before = controller.api_writes_to("event").await;
    env.apply(&pooled_batch_yaml("healthy", "p", 1));
    env.wait_batch_ready("healthy", 1, T).await;
    wait_pool(&env, "p", 2, 1, 1).await;
    assert_eq!(
        controller.api_writes_to("event").await,
        writes_before,
        "a healthy claim (and the pool's refill) wrote events"
    );
    assert_eq!(
        events_section(&describe("batchsandbox", "healthy")).trim(),
        "<none>"
    );

    // Allocation failures: the pool is at poolMax with no idle pod; a pool that does not exist.
    env.apply(&pooled_batch_yaml("too-many", "p", 2));
    env.apply(&pooled_batch_yaml("orphan", "no-such-pool", 1));
    env.wait_for("a PoolCapacityExhausted warning on too-many", T, || async {
        let events = events_section(&describe("batchsandbox", "too-many"));
        (events.contains("Warning") && events.contains("PoolCapacityExhausted"))
            .then_some(())
            .ok_or(events)
    })
    .await;
    env.wait_for("a PoolNotFound warning on orphan", T, || async {
        let events = events_section(&describe("batchsandbox", "orphan"));
        (events.contains("Warning") && events.contains("PoolNotFound"))
            .then_some(())
            .ok_or(events)
    })
    .await;

    // Recycling: the pool says which batch gave pods back and what became of them. (kube's event
    // recorder folds repeated events of one reason on one object into a series that keeps the
    // first message, so only one batch gives pods back here.)
    env.kubectl_ok(&["delete", "batchsandbox", "healthy", "--wait=false"]);
    env.wait_for("a Recycled event on the pool", T, || async {
        let events = events_section(&describe("pool", "p"));
        (events.contains("Recycled") && events.contains("BatchSandbox healthy gave back 1 pod(s)"))
            .then_some(())
            .ok_or(events)
    })
    .await;

    // Expiry.
    let expire_at =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(3);
    env.apply(&format!(
        "{}  expireTime: \"{}\"\n",
        pooled_batch_yaml("short", "p", 1),
        expire_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    ));
    env.wait_for_kubectl(
        "an Expired event on short",
        T,
        &[
            "get",
            "events",
            "--field-selector",
            "reason=Expired,involvedObject.name=short",
            "-o",
            "name",
        ],
        |events| !events.trim().is_empty(),
    )
    .await;
}

/// A ledger made unreadable while no controller ran (written around admission) still keeps its
/// pods from other batches after the restart: the new process never read it, so it holds every
/// pod of the pool it did not make itself and serves new claims from pods it makes. Deleting the
/// batch deletes those pods instead of returning them to the pool.
#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_corrupted_while_no_controller_ran_keeps_its_pods_after_a_restart() {
    let env = env("unreadable-restart").await;
    let mut controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("p", [1, 2, 1, 6]).yaml());
    env.apply(&pooled_batch_yaml("victim", "p", 1));
    let victim_pods = ledger(&env.wait_batch_ready("victim", 1, T).await);
    // The victim's pod and at least one idle pod made by the first process.
    env.wait_for("an idle pod beside the victim's", T, || async {
        env.pool("p")
            .await
            .and_then(|p| p.status)
            .is_some_and(|s| s.allocated == 1 && s.available >= 1)
    })
    .await;
    let selector = format!("{}=p", names::LABEL_POOL_NAME);
    let older: HashSet<String> = env
        .live_pods(&selector)
        .await
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    assert!(
        older.len() >= 2 && older.contains(&victim_pods[0]),
        "{older:?}"
    );

    controller.kill();
    env.kubectl_ok(&[
        "annotate",
        "--overwrite",
        "batchsandbox",
        "victim",
        &format!("{}={{", names::ANNOTATION_ALLOC_STATUS),
    ]);
    controller.restart();

    env.apply(&pooled_batch_yaml("newcomer", "p", 1));
    let granted = ledger(&env.wait_batch_ready("newcomer", 1, T).await);
    assert!(
        granted.iter().all(|pod| !older.contains(pod)),
        "the newcomer got {granted:?}, a pod the unreadable ledger may hold (older: {older:?})"
    );

    env.kubectl_ok(&["delete", "batchsandbox", "victim", "--wait=false"]);
    env.wait_for("the victim to be deleted", T, || async {
        env.batch("victim").await.is_none()
    })
    .await;
    let live: HashSet<String> = env
        .live_pods(&selector)
        .await
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    let kept: Vec<&String> = older.intersection(&live).collect();
    assert!(
        kept.is_empty(),
        "pods the unreadable ledger may have held were returned to the pool: {kept:?}"
    );
    assert!(
        granted.iter().all(|pod| live.contains(pod)),
        "the newcomer's pod stays: {granted:?}, live {live:?}"
    );
}

/// Deletes this test's cluster-scoped admission policy and binding when the test ends, passed or
/// not.
struct ClusterScoped<'a> {
    env: &'a crate::harness::TestEnv,
    kinds: &'static str,
    name: String,
}

impl Drop for ClusterScoped<'_> {
    fn drop(&mut self) {
        let _ = self
            .env
            .kubectl(&["delete", self.kinds, &self.name, "--ignore-not-found"]);
    }
}

/// A grant the API server rejects (here a ValidatingAdmissionPolicy denies allocations to one
/// batch) is not resent at the pace of the pool's rounds: the batch is held back for a growing
/// delay, a Warning `AllocationRejected` event carries the server's message, and the pool's
/// other batches are served meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_allocation_backs_off_and_is_reported() {
    let env = env("rejected-allocation").await;
    let policy = format!("deny-alloc-{}", env.ns);
    let _policy = ClusterScoped {
        env: &env,
        kinds: "validatingadmissionpolicy,validatingadmissionpolicybinding",
        name: policy.clone(),
    };
    env.apply(&format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {policy}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: ["sandbox.opensandbox.io"]
      apiVersions: ["v1alpha1"]
      operations: ["UPDATE"]
      resources: ["batchsandboxes"]
  validations:
  - expression: "!object.metadata.name.startsWith('denied') || !has(object.metadata.annotations) || !('{annotation}' in object.metadata.annotations)"
    message: "allocations to this batch are not allowed here"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {policy}
spec:
  policyName: {policy}
  validationActions: ["Deny"]
  matchResources:
    namespaceSelector:
      matchLabels:
        kubernetes.io/metadata.name: {ns}
"#,
        annotation = names::ANNOTATION_ALLOC_STATUS,
        ns = env.ns,
    ));
    // The policy is in force once a server-side dry run of an allocation is denied; a probe
    // batch of a pool that does not exist is never allocated to.
    env.apply(&pooled_batch_yaml("denied-probe", "no-such-pool", 1));
    env.wait_for("the admission policy in force", T, || async {
        let out = env.kubectl(&[
            "annotate",
            "batchsandbox",
            "denied-probe",
            &format!("{}={{}}", names::ANNOTATION_ALLOC_STATUS),
            "--dry-run=server",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (!out.status.success() && stderr.contains("not allowed here"))
            .then_some(())
            .ok_or(stderr)
    })
    .await;

    let controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("p", [1, 2, 2, 3]).yaml());
    wait_pool(&env, "p", 2, 0, 2).await;
    env.apply(&pooled_batch_yaml("denied", "p", 1));
    let rejected = env
        .wait_for_kubectl(
            "an AllocationRejected warning on denied",
            T,
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=denied,reason=AllocationRejected",
                "-o",
                "jsonpath={.items[*].message}",
            ],
            |events| !events.trim().is_empty(),
        )
        .await;
    assert!(
        rejected.contains("allocations to this batch are not allowed here"),
        "the event carries the server's message: {rejected}"
    );
    // Its status says so too, in the server's words.
    let unavailable = env
        .wait_for_kubectl(
            "denied's status to tell the rejection",
            T,
            &[
                "get",
                "batchsandbox",
                "denied",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"PoolUnavailable\")]}",
            ],
            |condition| condition.contains("\"reason\":\"AllocationRejected\""),
        )
        .await;
    assert!(
        unavailable.contains("\"status\":\"True\"")
            && unavailable.contains("allocations to this batch are not allowed here"),
        "{unavailable}"
    );

    // The pool's other batches are served meanwhile.
    env.apply(&pooled_batch_yaml("served", "p", 1));
    env.wait_batch_ready("served", 1, T).await;

    // Held back, the rejected batch's grant is resent a handful of times in three seconds (its
    // backoff doubles from 200 ms), not at the pace of the pool's rounds.
    let before = controller.api_writes_to("batchsandbox").await;
    let window = tokio::time::Instant::now();
    env.wait_for("three seconds to pass", T, || async {
        window.elapsed() >= Duration::from_secs(3)
    })
    .await;
    let resent = controller.api_writes_to("batchsandbox").await - before;
    assert!(resent <= 5, "{resent} grant writes in three seconds");
    let ledger_of_denied = env.kubectl_ok(&[
        "get",
        "batchsandbox",
        "denied",
        "-o",
        &format!(
            "jsonpath={{.metadata.annotations.{}}}",
            names::ANNOTATION_ALLOC_STATUS.replace('.', "\\.")
        ),
    ]);
    assert!(
        ledger_of_denied.trim().is_empty(),
        "the policy kept the allocation out: {ledger_of_denied}"
    );
}
