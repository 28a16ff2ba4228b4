//! `poolRef: "*"`: the controller chooses a Pool whose pods fit the batch's template (same image,
//! requests covered, least allocated, ties by name), writes it into `spec.poolRef`, and the batch
//! then runs as an ordinary pooled batch. A batch no Pool fits says why, and takes a Pool that
//! starts to fit without being edited. The CRD admits `"*"` only with a template.

use std::time::Duration;

use sandbox_domain::api::{BatchSandbox, GROUP, VERSION};

use crate::harness::{TestEnv, env, in_namespace};

const T: Duration = Duration::from_secs(90);

/// A Pool of one `sandbox` container running `image` with `cpu` requested, keeping one idle pod.
fn pool_yaml(name: &str, image: &str, cpu: &str) -> String {
    format!(
        r#"apiVersion: {GROUP}/{VERSION}
kind: Pool
metadata:
  name: {name}
spec:
  template:
    spec:
      containers:
      - name: sandbox
        image: {image}
        resources:
          requests:
            cpu: "{cpu}"
            memory: 1Gi
  capacitySpec:
    bufferMin: 1
    bufferMax: 1
    poolMin: 0
    poolMax: 10
"#
    )
}

/// A batch asking the controller to choose: `python:3.12` with 500m CPU and 512Mi memory.
fn choosing_batch_yaml(name: &str) -> String {
    format!(
        r#"apiVersion: {GROUP}/{VERSION}
kind: BatchSandbox
metadata:
  name: {name}
spec:
  replicas: 1
  poolRef: "*"
  template:
    spec:
      containers:
      - name: main
        image: python:3.12
        resources:
          requests:
            cpu: 500m
            memory: 512Mi
"#
    )
}

async fn wait_pool_counts(env: &TestEnv, name: &str, total: i32, allocated: i32) {
    env.wait_for(
        &format!("Pool {name}: total {total}, allocated {allocated}"),
        T,
        || async {
            let counts = env
                .pool(name)
                .await
                .and_then(|p| p.status)
                .map(|s| (s.total, s.allocated));
            if counts == Some((total, allocated)) {
                Ok(())
            } else {
                Err(format!("{counts:?}"))
            }
        },
    )
    .await;
}

/// Waits until the batch's `spec.poolRef` names a Pool; returns it.
async fn wait_chosen(env: &TestEnv, batch: &str) -> String {
    env.wait_for(
        &format!("BatchSandbox {batch} to get a Pool chosen"),
        T,
        || async {
            let pool_ref = env.batch(batch).await.and_then(|b| b.spec.pool_ref);
            match pool_ref.as_deref() {
                Some(pool) if pool != "*" => Ok(pool.to_string()),
                other => Err(format!("poolRef {other:?}")),
            }
        },
    )
    .await
}

fn condition<'a>(
    batch: &'a BatchSandbox,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    batch
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_ref_star_takes_the_least_allocated_pool_that_fits() {
    let env = env("select-least-allocated").await;
    let _controller = env.start_controller(&[]);
    for yaml in [
        pool_yaml("other-image", "node:22", "1"),
        pool_yaml("too-small", "python:3.12", "250m"),
        pool_yaml("fits-b", "python:3.12", "1"),
        pool_yaml("fits-c", "python:3.12", "1"),
    ] {
        env.apply(&yaml);
    }
    for pool in ["other-image", "too-small", "fits-b", "fits-c"] {
        wait_pool_counts(&env, pool, 1, 0).await;
    }

    // fits-b and fits-c are equally (un)allocated: the first name wins. The other two do not fit.
    env.apply(&choosing_batch_yaml("first"));
    assert_eq!(wait_chosen(&env, "first").await, "fits-b");
    let first = env.wait_batch_ready("first", 1, T).await;
    assert!(
        condition(&first, "PoolSelectionPending").is_none(),
        "{:?}",
        first.status
    );
    // The template stays; the batch is an ordinary pooled batch of fits-b.
    assert!(first.spec.template.is_some());
    wait_pool_counts(&env, "fits-b", 2, 1).await;

    // Now fits-b is half allocated and fits-c not at all: fits-c is the least allocated.
    env.apply(&choosing_batch_yaml("second"));
    assert_eq!(wait_chosen(&env, "second").await, "fits-c");
    env.wait_batch_ready("second", 1, T).await;
    for pool in ["other-image", "too-small"] {
        wait_pool_counts(&env, pool, 1, 0).await;
    }

    // The choice is final: the CRD refuses moving the batch to another Pool.
    let out = env.kubectl(&[
        "patch",
        "batchsandbox",
        "second",
        "--type=merge",
        "-p",
        r#"{"spec":{"poolRef":"fits-b"}}"#,
    ]);
    assert!(!out.status.success(), "moving a chosen batch was allowed");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.poolRef is immutable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_ref_star_waits_with_a_reason_and_takes_a_pool_that_starts_to_fit() {
    let env = env("select-no-fit").await;
    let _controller = env.start_controller(&[]);
    env.apply(&pool_yaml("other-image", "node:22", "1"));
    env.apply(&pool_yaml("too-small", "python:3.12", "250m"));
    env.apply(&choosing_batch_yaml("waiting"));

    let message = env
        .wait_for(
            "BatchSandbox waiting to report why no Pool fits",
            T,
            || async {
                let batch = env.batch("waiting").await.ok_or("no batch")?;
                let pending = condition(&batch, "PoolSelectionPending")
                    .filter(|c| c.status == "True" && c.reason == "NoEligiblePool")
                    .ok_or_else(|| format!("{:?}", batch.status))?;
                let message = pending.message.clone();
                if message.contains("too-small") && message.contains("other-image") {
                    Ok(message)
                } else {
                    Err(message)
                }
            },
        )
        .await;
    assert!(
        message.starts_with("0/2 pools fit: ")
            && message.contains("other-image: images [node:22] not [python:3.12]")
            && message.contains("too-small: requests cpu 250m < 500m"),
        "{message}"
    );
    let batch = env.batch("waiting").await.expect("the batch");
    assert_eq!(batch.spec.pool_ref.as_deref(), Some("*"));
    let ready = condition(&batch, "Ready").expect("a Ready condition");
    assert_eq!(ready.status, "False");

    // A Pool that fits appears: the batch takes it without being touched.
    env.apply(&pool_yaml("fits", "python:3.12", "1"));
    assert_eq!(wait_chosen(&env, "waiting").await, "fits");
    let batch = env.wait_batch_ready("waiting", 1, T).await;
    assert!(
        condition(&batch, "PoolSelectionPending").is_none(),
        "{:?}",
        batch.status
    );
}

#[tokio::test]
async fn the_crd_admits_pool_ref_star_only_with_a_template() {
    let env = env("select-crd").await;
    let dry_run = |yaml: &str| {
        env.kubectl_stdin(
            &["apply", "--dry-run=server", "-f", "-"],
            &in_namespace(yaml, &env.ns),
        )
    };
    let out = dry_run(&choosing_batch_yaml("ok"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let no_template = format!(
        "apiVersion: {GROUP}/{VERSION}\nkind: BatchSandbox\nmetadata:\n  name: bare\nspec:\n  poolRef: \"*\"\n"
    );
    let out = dry_run(&no_template);
    assert!(
        !out.status.success(),
        "poolRef \"*\" without a template was admitted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.poolRef \\\"*\\\" needs spec.template")
            || String::from_utf8_lossy(&out.stderr)
                .contains("spec.poolRef \"*\" needs spec.template"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let named = choosing_batch_yaml("named").replace("poolRef: \"*\"", "poolRef: fits");
    let out = dry_run(&named);
    assert!(
        !out.status.success(),
        "a named poolRef with a template was admitted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("spec.template cannot be set together with a named spec.poolRef"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
