//! A Pool's `recycleStrategy.type` with a real task still running when its batch gives the pod
//! back: each task leaves a `setsid sleep` behind (out of its process group, the kind that used
//! to outlive its task) and records its pid, so the test can look it up in the process table.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use sandbox_domain::api::names;

use crate::controller::ledger;
use crate::executor::alive;
use crate::fixtures;
use crate::harness::{TestEnv, env};

const T: Duration = Duration::from_secs(60);

/// A one-shard pooled batch whose task starts a `setsid sleep`, writes its pid and its own to
/// `pid_file`, runs `then`, and keeps running as a `sleep`.
fn leaving_batch(name: &str, pool: &str, pid_file: &Path, then: &str) -> String {
    let script = format!(
        "setsid sleep 1000 & echo $! $$ $PPID > {}.tmp && mv {0}.tmp {0}; {then} exec sleep 1000",
        pid_file.display()
    );
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: {name}\nspec:\n  replicas: 1\n  poolRef: {pool}\n  taskTemplate:\n    spec:\n      process:\n        command: [sh, -c, {}]\n",
        serde_json::to_string(&script).expect("script as YAML string")
    )
}

/// The left-behind `sleep` (`.0`) and the task's own process (`.1`); both are killed at the end
/// of a test, whatever happened. `.2` is the task's supervisor.
struct Leftover(u32, u32, u32);

impl Drop for Leftover {
    fn drop(&mut self) {
        for pid in [self.0, self.1] {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32).filter(|_| pid > 1) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

fn read_pids(path: &Path) -> Option<Leftover> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut pids = text.split_whitespace().map(|p| p.parse().ok());
    Some(Leftover(pids.next()??, pids.next()??, pids.next()??))
}

/// Starts the batch, waits for its task to run and leave its `sleep` behind; returns the pod
/// and the leftover's pid.
async fn running_task(env: &TestEnv, name: &str, then: &str) -> (String, Leftover) {
    let pid_file = env.scratch().join(format!("{name}.pid"));
    env.apply(&leaving_batch(name, "p", &pid_file, then));
    let leftover = env
        .wait_for("the task to start its background sleep", T, || async {
            read_pids(&pid_file)
        })
        .await;
    assert!(
        alive(leftover.0),
        "the background sleep {} runs",
        leftover.0
    );
    let pod = env
        .wait_for("the batch to hold a pod", T, || async {
            env.batch(name)
                .await
                .and_then(|b| ledger(&b).first().cloned())
                .filter(|p| !p.is_empty())
        })
        .await;
    (pod, leftover)
}

/// Waits until `pod` is idle in pool `p` again: live, held by no batch, nothing allocated.
async fn wait_idle_again(env: &TestEnv, pod: &str) {
    env.wait_for(
        &format!("pod {pod} to be idle in the pool again"),
        T,
        || async {
            let live = env
                .live_pods(&format!("{}=p", names::LABEL_POOL_NAME))
                .await;
            let batches = env.batches().list(&Default::default()).await;
            let pool = env.pool("p").await;
            live.iter().any(|p| p.metadata.name.as_deref() == Some(pod))
                && batches.is_ok_and(|b| b.items.is_empty())
                && pool
                    .and_then(|p| p.status)
                    .is_some_and(|s| s.allocated == 0)
        },
    )
    .await;
}

async fn wait_deleted(env: &TestEnv, pod: &str) {
    env.wait_for(&format!("pod {pod} to be deleted"), T, || async {
        env.pods()
            .get_opt(pod)
            .await
            .is_ok_and(|p| p.is_none_or(|p| p.metadata.deletion_timestamp.is_some()))
    })
    .await;
}

fn pool_with(strategy: &str) -> String {
    fixtures::pool("p", [1, 2, 1, 4]).recycle(strategy).yaml()
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_recycling_deletes_the_pod_of_a_running_task() {
    let env = env("recycle-delete").await;
    let _controller = env.start_controller(&[]);
    env.apply(&pool_with("Delete"));
    let (pod, leftover) = running_task(&env, "b", "").await;
    env.kubectl_ok(&["delete", "batchsandbox", "b", "--wait=false"]);
    wait_deleted(&env, &pod).await;
    assert!(
        !alive(leftover.0),
        "the task's setsid sleep {} outlived its task",
        leftover.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_recycling_returns_the_pod_only_after_every_task_process_ended() {
    let env = env("recycle-restart").await;
    let _controller = env.start_controller(&[]);
    env.apply(&pool_with("Restart"));
    let (pod, leftover) = running_task(&env, "b", "").await;
    env.kubectl_ok(&["delete", "batchsandbox", "b", "--wait=false"]);
    wait_idle_again(&env, &pod).await;
    assert!(
        !alive(leftover.0),
        "the previous holder's setsid sleep {} still runs in a pod returned to the pool",
        leftover.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn noop_recycling_returns_the_pod_as_is() {
    let env = env("recycle-noop").await;
    let _controller = env.start_controller(&[]);
    env.apply(&pool_with("Noop"));
    let (pod, _leftover) = running_task(&env, "b", "").await;
    let uid = env.pods().get(&pod).await.expect("the pod").metadata.uid;
    env.kubectl_ok(&["delete", "batchsandbox", "b", "--wait=false"]);
    wait_idle_again(&env, &pod).await;
    let returned = env.pods().get(&pod).await.expect("the returned pod");
    assert_eq!(returned.metadata.uid, uid, "the same pod object came back");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_recycling_deletes_the_pod_when_the_stop_cannot_be_confirmed() {
    let env = env("recycle-restart-unconfirmed").await;
    let _controller = env.start_controller(&[]);
    env.apply(&pool_with("Restart"));
    // The task's supervisor is killed (from outside: the task runs as another user and cannot
    // signal it); the executor then cannot vouch for what the task left behind.
    let (pod, leftover) = running_task(&env, "b", "").await;
    let supervisor = rustix::process::Pid::from_raw(leftover.2 as i32).expect("supervisor pid");
    rustix::process::kill_process(supervisor, rustix::process::Signal::KILL)
        .expect("kill the supervisor");
    env.kubectl_ok(&["delete", "batchsandbox", "b", "--wait=false"]);
    wait_deleted(&env, &pod).await;
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let note = env
        .wait_for("a RecycleUnconfirmed event", T, || async {
            events
                .list(&ListParams::default().fields("reason=RecycleUnconfirmed"))
                .await
                .ok()
                .and_then(|l| l.items.into_iter().find_map(|e| e.message))
        })
        .await;
    assert!(
        note.contains(&pod) && note.contains("cannot confirm"),
        "the event says which pod and why: {note}"
    );
    drop(leftover);
}
