//! WebAssembly policies in a running controller: a custom policy loaded from a ConfigMap at
//! runtime (no restart) resizes a Pool and hot-reloads on change; a broken revision keeps the last
//! good one serving; a hostile policy degrades a Pool visibly while the controller stays up.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use sandbox_policy::embedded;

use crate::fixtures;
use crate::harness::{TestEnv, env};

const T: Duration = Duration::from_secs(90);

fn component(crate_name: &str) -> Vec<u8> {
    let path = embedded::built_component(crate_name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn policy_config_map(name: &str, wasm: Vec<u8>, settings: &str) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.metadata.labels = Some(BTreeMap::from([(
        sandbox_policy::names::LABEL_POLICY.to_string(),
        "true".to_string(),
    )]));
    cm.binary_data = Some(BTreeMap::from([(
        sandbox_policy::names::POLICY_CONFIGMAP_WASM_KEY.to_string(),
        ByteString(wasm),
    )]));
    cm.data = Some(BTreeMap::from([(
        sandbox_policy::names::POLICY_CONFIGMAP_SETTINGS_KEY.to_string(),
        settings.to_string(),
    )]));
    cm
}

/// Waits until the Pool reports `total` pods and its `PolicyDegraded` condition is `degraded`
/// with a message containing `message`; returns that message.
async fn wait_pool(env: &TestEnv, name: &str, total: i32, degraded: bool, message: &str) -> String {
    let what =
        format!("Pool {name}: total {total}, PolicyDegraded {degraded} mentioning {message:?}");
    env.wait_for(&what, T, || async {
        let status = env.pool(name).await.and_then(|p| p.status);
        let Some(status) = status else {
            return Err("no status".to_string());
        };
        let condition = status
            .conditions
            .iter()
            .find(|c| c.type_ == "PolicyDegraded");
        let observed = (
            status.total,
            condition.map(|c| (c.status.clone(), c.message.clone())),
        );
        match condition {
            Some(c)
                if status.total == total
                    && (c.status == "True") == degraded
                    && c.message.contains(message) =>
            {
                Ok(c.message.clone())
            }
            _ => Err(format!("{observed:?}")),
        }
    })
    .await
}

async fn has_warning_event(env: &TestEnv, object: &str, reason: &str, message: &str) -> bool {
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let list = events
        .list(&ListParams::default())
        .await
        .expect("listing events");
    list.items.iter().any(|e| {
        e.type_.as_deref() == Some("Warning")
            && e.reason.as_deref() == Some(reason)
            && e.involved_object.name.as_deref() == Some(object)
            && e.message.as_deref().is_some_and(|m| m.contains(message))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_map_policy_loaded_at_runtime_resizes_a_pool_without_a_restart() {
    let env = env("policy-configmap").await;
    let mut controller = env.start_controller(&["--policy-namespace", &env.ns]);
    env.apply(
        &fixtures::pool("demand-pool", [1, 2, 0, 10])
            .annotation(
                &format!(
                    "{}pool-sizing",
                    sandbox_domain::api::names::ANNOTATION_POLICY_PREFIX
                ),
                "demand",
            )
            .yaml(),
    );

    // Nothing named "demand" is loaded yet: the embedded default sizes the pool, and says so.
    wait_pool(&env, "demand-pool", 1, true, "not loaded").await;
    // Events of one reason are aggregated into a series that keeps its first message; the
    // condition above carries the latest reason.
    env.wait_for("a PolicyDegraded Warning event", T, || {
        has_warning_event(&env, "demand-pool", "PolicyDegraded", "not loaded")
    })
    .await;

    // Load the demand-aware example at runtime: its buffer is 4 wider.
    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let cm = policy_config_map(
        "demand",
        component("demand-aware-sizing"),
        r#"{"minExtra": 4}"#,
    );
    config_maps
        .create(&PostParams::default(), &cm)
        .await
        .expect("creating the policy ConfigMap");
    wait_pool(&env, "demand-pool", 5, false, "").await;
    assert!(
        controller.is_running(),
        "the policy was loaded without restarting the controller"
    );

    // A settings change is hot-reloaded.
    let settings = serde_json::json!({ "data": { sandbox_policy::names::POLICY_CONFIGMAP_SETTINGS_KEY: r#"{"minExtra": 2}"# } });
    config_maps
        .patch("demand", &PatchParams::default(), &Patch::Merge(&settings))
        .await
        .expect("patching settings");
    wait_pool(&env, "demand-pool", 3, false, "").await;

    // A broken revision does not load: the last good one keeps deciding, and the Pool says so.
    let broken = policy_config_map("demand", b"definitely not wasm".to_vec(), "{}");
    config_maps
        .replace("demand", &PostParams::default(), &broken)
        .await
        .expect("replacing the ConfigMap");
    let message = wait_pool(
        &env,
        "demand-pool",
        3,
        true,
        "latest revision failed to load",
    )
    .await;
    assert!(message.contains("last good revision"), "{message}");
    assert!(controller.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_policy_degrades_a_pool_while_the_controller_stays_up() {
    let env = env("policy-hostile").await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("runaway.wasm"), component("hostile"))
        .expect("writing the policy");
    std::fs::write(dir.path().join("runaway.json"), r#"{"mode": "loop"}"#)
        .expect("writing its settings");
    let policy_dir = dir.path().display().to_string();
    let mut controller =
        env.start_controller(&["--policy-dir", &policy_dir, "--policy-poll-seconds", "1"]);

    // The policy never returns: the fail-safe keeps the current size within bounds (poolMin 2).
    env.apply(
        &fixtures::pool("guarded-pool", [3, 4, 2, 6])
            .annotation(
                &format!(
                    "{}pool-sizing",
                    sandbox_domain::api::names::ANNOTATION_POLICY_PREFIX
                ),
                "runaway",
            )
            .yaml(),
    );
    wait_pool(&env, "guarded-pool", 2, true, "ran out of fuel").await;
    env.wait_for("a PolicyDegraded Warning event", T, || {
        has_warning_event(&env, "guarded-pool", "PolicyDegraded", "ran out of fuel")
    })
    .await;

    // Replacing the file with a sane policy (the embedded default's source) recovers the pool.
    std::fs::write(
        dir.path().join("runaway.wasm"),
        component("default-pool-sizing"),
    )
    .expect("replacing the policy");
    std::fs::write(dir.path().join("runaway.json"), "{}").expect("replacing its settings");
    wait_pool(&env, "guarded-pool", 3, false, "").await;
    assert!(
        controller.is_running(),
        "the controller stayed up throughout"
    );
}
