//! Tasks as real processes: dispatched by the controller to the task executor that the local
//! runner serves on each pod's 127.1.x.y address.

use std::time::{Duration, SystemTime};

use sandbox_domain::api::BatchSandboxStatus;

use crate::controller::ledger;
use crate::fixtures;
use crate::harness::{TestEnv, env, spec_manifest};

const T: Duration = Duration::from_secs(60);

/// A pooled batch whose shards run `commands[i]` (each a list of argv words).
fn task_batch(name: &str, pool: &str, commands: &[&[&str]], extra_spec: &str) -> String {
    let patches: String = commands
        .iter()
        .map(|argv| {
            let (command, args) = argv.split_first().expect("a command");
            let args: Vec<String> = args
                .iter()
                .map(|a| serde_json::to_string(a).unwrap())
                .collect();
            format!(
                "  - spec:\n      process:\n        command: [{}]\n        args: [{}]\n",
                serde_json::to_string(command).unwrap(),
                args.join(", ")
            )
        })
        .collect();
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: {name}\nspec:\n  replicas: {}\n  poolRef: {pool}\n{extra_spec}  shardTaskPatches:\n{patches}",
        commands.len()
    )
}

async fn wait_counts(
    env: &TestEnv,
    name: &str,
    what: &str,
    f: impl Fn(&BatchSandboxStatus) -> bool,
) -> BatchSandboxStatus {
    env.wait_for(what, T, || async {
        let status = env
            .batch(name)
            .await
            .and_then(|b| b.status)
            .unwrap_or_default();
        if f(&status) {
            Ok(status)
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn spec_heterogeneous_tasks_really_run() {
    let env = env("hetero-tasks").await;
    let _controller = env.start_controller(&[]);
    env.apply(&spec_manifest("pool"));
    env.apply(&spec_manifest("heterogeneous-tasks"));
    // python -m http.server, a bash loop and sleep 3600 all keep running.
    wait_counts(&env, "task-batch", "3 running tasks", |s| {
        s.task_running == 3 && s.ready == 3
    })
    .await;
    let wide = env.kubectl_ok(&["get", "batchsandbox", "task-batch", "-o", "wide"]);
    let header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "DESIRED",
            "TOTAL",
            "ALLOCATED",
            "READY",
            "TASK_RUNNING",
            "TASK_SUCCEED",
            "TASK_FAILED",
            "AGE"
        ]
    );
    let row: Vec<&str> = wide
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..8],
        ["task-batch", "3", "3", "3", "3", "3", "0", "0"],
        "{wide}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_and_timeouts_are_counted() {
    let env = env("task-outcomes").await;
    let _controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("p", [3, 6, 3, 10]).yaml());
    // Shard 0 exits 0, shard 1 exits 1, shard 2 outlives its 1 s limit.
    let yaml = r#"apiVersion: sandbox.opensandbox.io/v1alpha1
kind: BatchSandbox
metadata:
  name: outcomes
spec:
  replicas: 3
  poolRef: p
  shardTaskPatches:
  - spec:
      process:
        command: ["true"]
  - spec:
      process:
        command: ["sh", "-c", "exit 1"]
  - spec:
      timeoutSeconds: 1
      process:
        command: ["sleep", "30"]
"#;
    env.apply(yaml);
    let status = wait_counts(&env, "outcomes", "1 succeeded, 2 failed", |s| {
        s.task_succeed == 1 && s.task_failed == 2
    })
    .await;
    let failed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "TaskFailed")
        .expect("TaskFailed condition");
    assert_eq!(failed.status, "True");
    assert_eq!(failed.message, "task failed on shard(s) 1, 2");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_batch_stops_its_tasks_before_its_pods_go() {
    let env = env("task-stop-order").await;
    let _controller = env.start_controller(&[]);
    let dir = env.scratch();
    let marker = dir.join("stopped");
    env.apply(&fixtures::pool("p", [3, 6, 3, 10]).yaml());
    let script = format!(
        "trap 'date +%s%N > {}; exit 0' TERM; while true; do sleep 0.05; done",
        marker.display()
    );
    env.apply(&task_batch("stopme", "p", &[&["bash", "-c", &script]], ""));
    wait_counts(&env, "stopme", "the task running", |s| s.task_running == 1).await;
    let pod = ledger(&env.batch("stopme").await.expect("batch"))[0].clone();

    env.kubectl_ok(&["delete", "batchsandbox", "stopme", "--wait=false"]);
    // Watch the pod: it must still be live when the task receives SIGTERM.
    let deleted_at = env
        .wait_for("the pod to be deleted", T, || async {
            let live = env
                .pods()
                .get_opt(&pod)
                .await
                .ok()
                .flatten()
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none());
            (!live).then(SystemTime::now)
        })
        .await;
    let stopped_nanos: u128 = std::fs::read_to_string(&marker)
        .expect("the task got SIGTERM and wrote its marker")
        .trim()
        .parse()
        .expect("nanos");
    let deleted_nanos = deleted_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    assert!(
        stopped_nanos < deleted_nanos,
        "the task was stopped {} ms after its pod was deleted",
        (stopped_nanos as i128 - deleted_nanos as i128) / 1_000_000
    );
    env.wait_for("the batch to be gone", T, || async {
        env.batch("stopme").await.is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn release_policy_frees_finished_shards_and_keeps_their_results() {
    let env = env("task-release").await;
    let _controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("p", [3, 6, 3, 10]).yaml());
    let yaml = task_batch(
        "rel",
        "p",
        &[&["true"], &["sleep", "3600"]],
        "  taskResourcePolicyWhenCompleted: Release\n",
    );
    env.apply(&yaml);
    let status = wait_counts(&env, "rel", "shard 0 released with its success kept", |s| {
        s.task_succeed == 1 && s.task_running == 1 && s.allocated == 1
    })
    .await;
    assert_eq!(status.ready, 1);
    let batch = env.batch("rel").await.expect("batch");
    let pods = ledger(&batch);
    assert_eq!(pods[0], "", "shard 0's pod went back to the pool");
    assert!(
        !pods[1].is_empty(),
        "shard 1 keeps its pod while its task runs"
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "True", "a released shard counts as complete");
    // The released shard is never given a pod again: another claim on the pool is served by
    // an allocation round that sees shard 0's empty slot, and leaves it empty.
    env.apply(&task_batch("after", "p", &[&["true"]], ""));
    wait_counts(&env, "after", "a later claim on the pool allocated", |s| {
        s.allocated == 1
    })
    .await;
    assert_eq!(ledger(&env.batch("rel").await.expect("batch"))[0], "");
}

#[tokio::test(flavor = "multi_thread")]
async fn task_arguments_are_passed_literally() {
    let env = env("task-literal").await;
    let _controller = env.start_controller(&[]);
    let dir = env.scratch();
    let pwned = dir.join("pwned");
    env.apply(&fixtures::pool("p", [3, 6, 3, 10]).yaml());
    let hostile = format!("; touch {}", pwned.display());
    env.apply(&task_batch(
        "lit",
        "p",
        &[
            &["echo", &hostile],
            &["sh", "-c", "test \"$1\" = \"$2\"", "sh", &hostile, &hostile],
        ],
        "",
    ));
    wait_counts(&env, "lit", "both tasks succeeded", |s| s.task_succeed == 2).await;
    assert!(!pwned.exists(), "an argument was interpreted by a shell");
}
