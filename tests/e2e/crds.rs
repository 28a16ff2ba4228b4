//! Issue 2: the CRDs against a real kube-apiserver, and the local control
//! plane's garbage collector and fake nodes. No controller runs in these tests.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use crate::fixtures;
use crate::harness::{
    self, TestEnv, in_namespace, spec_manifest, spec_manifest_names, with_future_expire,
};

const GROUP: &str = "sandbox.opensandbox.io";
const VERSION: &str = "v1alpha1";

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn batchsandbox_api(env: &TestEnv) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "BatchSandbox"),
        "batchsandboxes",
    );
    Api::namespaced_with(env.client.clone(), &env.ns, &ar)
}

/// A minimal valid non-pooled BatchSandbox.
fn batch_yaml(name: &str, replicas: i64) -> String {
    format!(
        r#"apiVersion: {GROUP}/{VERSION}
kind: BatchSandbox
metadata:
  name: {name}
spec:
  replicas: {replicas}
  template:
    spec:
      containers:
      - name: sandbox
        image: busybox:1.36
        command: ["sleep", "infinity"]
"#
    )
}

/// `kubectl apply --dry-run=server` of `yaml` into the test namespace.
fn dry_run(env: &TestEnv, yaml: &str) -> std::process::Output {
    env.kubectl_stdin(
        &["apply", "--dry-run=server", "-f", "-"],
        &in_namespace(yaml, &env.ns),
    )
}

#[tokio::test]
async fn crds_install_and_serve_both_kinds() {
    let env = harness::env("crds_install").await;

    // env() applied crds/; applying again must be a clean no-op.
    let crd_dir = harness::repo_root().join("crds");
    let out = env.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=sbx-e2e",
        "-f",
        crd_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "re-applying crds/: {}", stderr(&out));

    for crd in [format!("batchsandboxes.{GROUP}"), format!("pools.{GROUP}")] {
        let established = env.kubectl_ok(&[
            "get",
            "crd",
            &crd,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ]);
        assert_eq!(established, "True", "CRD {crd} is not Established");
    }

    let resources = env.kubectl_ok(&["api-resources", "--api-group", GROUP, "--no-headers"]);
    let rows: Vec<Vec<&str>> = resources
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let bsbx = rows
        .iter()
        .find(|r| r.first() == Some(&"batchsandboxes"))
        .unwrap_or_else(|| panic!("batchsandboxes not served:\n{resources}"));
    assert!(
        bsbx.contains(&"bsbx"),
        "BatchSandbox lacks the bsbx short name:\n{resources}"
    );
    assert!(
        bsbx.contains(&"true"),
        "BatchSandbox must be namespaced:\n{resources}"
    );
    assert!(
        rows.iter()
            .any(|r| r.first() == Some(&"pools") && r.contains(&"Pool")),
        "pools not served:\n{resources}"
    );

    // The short name works end to end.
    let out = env.kubectl(&["get", "bsbx"]);
    assert!(out.status.success(), "kubectl get bsbx: {}", stderr(&out));
}

#[tokio::test]
async fn every_spec_manifest_passes_server_dry_run() {
    let env = harness::env("spec_manifests_dry_run").await;
    let names = spec_manifest_names();
    for expected in [
        "basic-batch.yaml",
        "pool.yaml",
        "pooled-batch.yaml",
        "expiring-batch.yaml",
        "heterogeneous-tasks.yaml",
        "rl-batch.yaml",
        "test-batch.yaml",
        "tenant-batch.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "examples/spec/{expected} is missing"
        );
    }

    for name in &names {
        let yaml = with_future_expire(&spec_manifest(name));
        let out = dry_run(&env, &yaml);
        assert!(
            out.status.success(),
            "spec manifest {name} was rejected by kubectl apply --dry-run=server:\n{}\n{yaml}",
            stderr(&out)
        );
        assert!(
            stdout(&out).contains("(server dry run)"),
            "{name}: {}",
            stdout(&out)
        );
    }

    // A dry run must not have created anything.
    let left = env.kubectl_ok(&["get", "batchsandboxes,pools", "-o", "name"]);
    assert!(left.trim().is_empty(), "dry runs created objects:\n{left}");
}

#[tokio::test]
async fn schema_and_cel_reject_invalid_objects() {
    let env = harness::env("crds_reject_invalid").await;

    // Positive controls, so the rejections below are about the one bad field.
    let ok = dry_run(&env, &batch_yaml("valid", 2));
    assert!(
        ok.status.success(),
        "valid BatchSandbox rejected: {}",
        stderr(&ok)
    );
    let ok = dry_run(
        &env,
        &fixtures::pool("valid", [1, 2, 0, 10])
            .image("busybox:1.36")
            .yaml(),
    );
    assert!(ok.status.success(), "valid Pool rejected: {}", stderr(&ok));
    // OpenSandbox's fields are known, not pruned: int and percent pacing, pause: false.
    for (scale, update) in [("3", "\"25%\""), ("\"0%\"", "0"), ("\"100%\"", "\"100%\"")] {
        let yaml = fixtures::pool("paced", [1, 2, 0, 10])
            .image("busybox:1.36")
            .spec_field(&format!(
                "scaleStrategy:\n  maxUnavailable: {scale}\nupdateStrategy:\n  maxUnavailable: {update}"
            ))
            .yaml();
        let out = env.kubectl_stdin(
            &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
            &in_namespace(&yaml, &env.ns),
        );
        assert!(
            out.status.success(),
            "paced Pool rejected: {}",
            stderr(&out)
        );
        let stored: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("kubectl -o json");
        assert_eq!(
            (
                stored["spec"]["scaleStrategy"]["maxUnavailable"].to_string(),
                stored["spec"]["updateStrategy"]["maxUnavailable"].to_string()
            ),
            (scale.to_string(), update.to_string()),
            "kept as written"
        );
    }
    let paused = format!("{}  pause: false\n", batch_yaml("unpaused", 1));
    let out = dry_run(&env, &paused);
    assert!(
        out.status.success(),
        "pause: false rejected: {}",
        stderr(&out)
    );

    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "replicas: -1",
            batch_yaml("negative", -1),
            &["spec.replicas"],
        ),
        (
            "bufferMin > bufferMax",
            fixtures::pool("inverted", [5, 2, 0, 10])
                .image("busybox:1.36")
                .yaml(),
            &["bufferMin", "bufferMax"],
        ),
        (
            "template and poolRef both set",
            format!("{}  poolRef: fast-pool\n", batch_yaml("both", 1)),
            &["template", "poolRef"],
        ),
        (
            "neither template nor poolRef",
            format!(
                "apiVersion: {GROUP}/{VERSION}\nkind: BatchSandbox\nmetadata:\n  name: neither\nspec:\n  replicas: 1\n"
            ),
            &["template", "poolRef"],
        ),
        (
            "pause: true",
            format!("{}  pause: true\n", batch_yaml("paused", 1)),
            &["spec.pause", "pause/resume is not supported"],
        ),
        (
            "maxUnavailable: 101%",
            fixtures::pool("over", [1, 2, 0, 10])
                .image("busybox:1.36")
                .spec_field("updateStrategy:\n  maxUnavailable: 101%")
                .yaml(),
            &[
                "spec.updateStrategy.maxUnavailable",
                "percentage from 0% to 100%",
            ],
        ),
        (
            "maxUnavailable: -2",
            fixtures::pool("negative-pacing", [1, 2, 0, 10])
                .image("busybox:1.36")
                .spec_field("scaleStrategy:\n  maxUnavailable: -2")
                .yaml(),
            &["spec.scaleStrategy.maxUnavailable"],
        ),
    ];
    for (what, yaml, mentions) in cases {
        let out = dry_run(&env, &yaml);
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "{what}: accepted but must be rejected:\n{yaml}"
        );
        assert!(
            err.contains("Invalid value") || err.contains("invalid"),
            "{what}: unexpected error: {err}"
        );
        for m in mentions {
            assert!(
                err.to_lowercase().contains(&m.to_lowercase()),
                "{what}: the error does not mention {m}: {err}"
            );
        }
    }
}

fn header(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn printer_columns_match_the_spec() {
    let env = harness::env("crds_printer_columns").await;
    env.apply(&batch_yaml("columns", 3));
    env.apply(
        &fixtures::pool("columns", [1, 2, 0, 10])
            .image("busybox:1.36")
            .yaml(),
    );

    // `kubectl get batchsandbox task-batch -o wide` in the spec prints:
    // NAME DESIRED TOTAL ALLOCATED READY TASK_RUNNING TASK_SUCCEED TASK_FAILED AGE
    let wide = header(&env.kubectl_ok(&["get", "batchsandbox", "-o", "wide"]));
    let pos = |h: &[String], c: &str| h.iter().position(|x| x == c);
    assert_eq!(
        wide[..5],
        ["NAME", "DESIRED", "TOTAL", "ALLOCATED", "READY"],
        "wide header: {wide:?}"
    );
    let run = pos(&wide, "TASK_RUNNING").unwrap_or_else(|| panic!("no TASK_RUNNING: {wide:?}"));
    assert_eq!(
        wide[run..run + 3],
        ["TASK_RUNNING", "TASK_SUCCEED", "TASK_FAILED"],
        "wide header: {wide:?}"
    );
    assert_eq!(
        wide.last().map(String::as_str),
        Some("AGE"),
        "wide header: {wide:?}"
    );
    let row: Vec<String> = env
        .kubectl_ok(&[
            "get",
            "batchsandbox",
            "columns",
            "-o",
            "wide",
            "--no-headers",
        ])
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(row[0], "columns");
    assert_eq!(row[1], "3", "DESIRED shows spec.replicas: {row:?}");

    // The default view has no task columns and ends with AGE.
    let narrow = header(&env.kubectl_ok(&["get", "batchsandbox"]));
    assert_eq!(
        narrow[..5],
        ["NAME", "DESIRED", "TOTAL", "ALLOCATED", "READY"],
        "header: {narrow:?}"
    );
    assert!(
        !narrow.iter().any(|c| c.starts_with("TASK_")),
        "header: {narrow:?}"
    );
    assert_eq!(
        narrow.last().map(String::as_str),
        Some("AGE"),
        "header: {narrow:?}"
    );

    let pool = header(&env.kubectl_ok(&["get", "pool"]));
    assert_eq!(
        pool,
        ["NAME", "TOTAL", "ALLOCATED", "AVAILABLE", "UPDATED", "AGE"],
        "pool header (OpenSandbox's columns): {pool:?}"
    );
    let wide_pool = header(&env.kubectl_ok(&["get", "pool", "-o", "wide"]));
    assert_eq!(
        wide_pool,
        [
            "NAME",
            "TOTAL",
            "ALLOCATED",
            "AVAILABLE",
            "UPDATED",
            "BUFFER_MIN",
            "BUFFER_MAX",
            "POOL_MIN",
            "POOL_MAX",
            "AGE"
        ],
        "wide pool header: {wide_pool:?}"
    );
}

#[tokio::test]
async fn explain_describes_pool_ref() {
    let env = harness::env("crds_explain").await;
    // kubectl explain reads the apiserver's OpenAPI, which is republished
    // asynchronously after a CRD changes; allow for that.
    let text = env
        .wait_for(
            "kubectl explain batchsandbox.spec.poolRef",
            Duration::from_secs(60),
            || async {
                let out = env.kubectl(&["explain", "batchsandbox.spec.poolRef"]);
                if out.status.success() {
                    Ok(stdout(&out))
                } else {
                    Err(stderr(&out))
                }
            },
        )
        .await;
    let description: String = text
        .split("DESCRIPTION:")
        .nth(1)
        .unwrap_or_else(|| panic!("no DESCRIPTION section:\n{text}"))
        .lines()
        .take_while(|l| !l.starts_with("FIELDS:"))
        .collect::<Vec<_>>()
        .join(" ");
    let words = description.split_whitespace().count();
    assert!(
        words >= 3 && !description.contains("<empty>"),
        "spec.poolRef needs a real description, got:\n{text}"
    );
    assert!(text.contains("poolRef"), "{text}");
}

#[tokio::test]
async fn pods_run_on_kwok_nodes_with_loopback_ips() {
    let env = harness::env("cluster_pod_running").await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let ip = env
        .wait_for(
            "pod probe to be Running with an IP",
            Duration::from_secs(30),
            || async {
                let p = pods.get("probe").await.map_err(|e| e.to_string())?;
                let status = p.status.unwrap_or_default();
                match (status.phase.as_deref(), status.pod_ip) {
                    (Some("Running"), Some(ip)) => Ok(ip),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    assert!(
        ip.starts_with("127.1."),
        "pod IP {ip} is not in 127.1.0.0/16"
    );
    let node = pods
        .get("probe")
        .await
        .unwrap()
        .spec
        .unwrap()
        .node_name
        .unwrap_or_default();
    assert!(node.starts_with("kwok-node-"), "scheduled to {node:?}");
}

#[tokio::test]
async fn garbage_collector_removes_pods_of_a_deleted_batchsandbox() {
    let env = harness::env("crds_gc").await;
    env.apply(&batch_yaml("owner", 1));
    let owner = batchsandbox_api(&env)
        .get("owner")
        .await
        .expect("get BatchSandbox");
    let uid = owner.metadata.uid.clone().expect("uid");

    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "owned",
            "ownerReferences": [{
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": "BatchSandbox",
                "name": "owner",
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": false
            }]
        },
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create owned pod");
    // A bystander without an owner must survive.
    let bystander: Pod = serde_json::from_value(json!({
        "metadata": {"name": "bystander"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &bystander)
        .await
        .expect("create bystander");

    batchsandbox_api(&env)
        .delete("owner", &DeleteParams::background())
        .await
        .expect("delete BatchSandbox");
    env.wait_for(
        "the BatchSandbox to be gone",
        Duration::from_secs(30),
        || async { matches!(batchsandbox_api(&env).get_opt("owner").await, Ok(None)) },
    )
    .await;

    // The garbage collector rediscovers API types periodically (30 s), so a
    // CRD installed after kube-controller-manager started may take a while.
    env.wait_for(
        "the garbage collector to delete pod owned",
        Duration::from_secs(120),
        || async {
            match pods.get_opt("owned").await {
                Ok(None) => Ok(()),
                Ok(Some(p)) => Err(format!(
                    "still there, deletionTimestamp={:?}",
                    p.metadata.deletion_timestamp
                )),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    assert!(
        pods.get_opt("bystander")
            .await
            .expect("get bystander")
            .is_some(),
        "the garbage collector deleted a pod without owner"
    );
}

#[tokio::test]
async fn dropping_a_test_env_removes_its_namespace_despite_finalizers() {
    let env = harness::env("harness_cleanup").await;
    let inner = harness::env("harness_cleanup_inner").await;
    // What a killed controller leaves behind: objects holding finalizers.
    let mut batch = batch_yaml("held", 1);
    batch = batch.replacen(
        "  name: held\n",
        "  name: held\n  finalizers: [e2e.sandbox.opensandbox.io/hold]\n",
        1,
    );
    inner.apply(&batch);
    inner.apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: held\n  finalizers: [e2e.sandbox.opensandbox.io/hold]\n\
         spec:\n  containers: [{name: c, image: busybox:1.36}]\n",
    );
    let ns = inner.ns.clone();
    drop(inner);

    env.wait_for(
        &format!("namespace {ns} to be deleted"),
        Duration::from_secs(60),
        || async {
            let out = env.kubectl(&["get", "namespace", &ns, "-o", "name", "--ignore-not-found"]);
            out.status.success() && stdout(&out).trim().is_empty()
        },
    )
    .await;
}
