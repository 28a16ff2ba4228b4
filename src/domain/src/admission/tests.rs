use super::*;
use proptest::prelude::*;
use serde_json::json;
use std::path::Path;

fn known_policy(name: &str) -> bool {
    matches!(name, "demand-aware" | "grace-period")
}

fn ctx_at(now: &str) -> AdmissionContext<'static> {
    AdmissionContext {
        now: now.parse().expect("test time"),
        max_replicas: DEFAULT_MAX_REPLICAS,
        policy_exists: &known_policy,
        controller_username: None,
    }
}

fn ctx() -> AdmissionContext<'static> {
    ctx_at("2026-06-01T00:00:00Z")
}

fn batch(value: Value) -> BatchSandbox {
    let (batch, errors) = decode_batch_sandbox(value);
    assert!(errors.is_empty(), "fixture does not decode: {errors:?}");
    batch.expect("fixture decodes")
}

fn pool(value: Value) -> Pool {
    let (pool, errors) = decode_pool(value);
    assert!(errors.is_empty(), "fixture does not decode: {errors:?}");
    pool.expect("fixture decodes")
}

fn pooled(spec: Value) -> Value {
    let mut spec = spec;
    spec.as_object_mut()
        .unwrap()
        .entry("poolRef")
        .or_insert(json!("fast-pool"));
    json!({"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": "b", "namespace": "ns"}, "spec": spec})
}

fn templated(spec: Value) -> Value {
    let mut spec = spec;
    spec.as_object_mut()
        .unwrap()
        .entry("template")
        .or_insert(json!({"spec": {"containers": [{"name": "main", "image": "nginx:latest"}]}}));
    json!({"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": "b", "namespace": "ns"}, "spec": spec})
}

fn pool_with(capacity: Value) -> Value {
    json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool",
        "metadata": {"name": "fast-pool", "namespace": "ns"},
        "spec": {
            "template": {"spec": {"containers": [{"name": "sandbox", "image": "opensandbox/code-interpreter:v1.0.1"}]}},
            "capacitySpec": capacity,
        }
    })
}

fn create(value: Value) -> Verdict {
    validate_batch_sandbox(&batch(value), None, &ctx())
}

fn update(old: Value, new: Value) -> Verdict {
    validate_batch_sandbox(&batch(new), Some(&batch(old)), &ctx())
}

fn paths(verdict: &Verdict) -> Vec<&str> {
    verdict.errors.iter().map(|e| e.path.as_str()).collect()
}

/// Asserts exactly one error, at `path`, and returns its message.
fn single_error(verdict: &Verdict, path: &str) -> String {
    assert_eq!(paths(verdict), [path], "{verdict:#?}");
    verdict.errors[0].to_string()
}

fn assert_allowed(verdict: &Verdict) {
    assert!(
        verdict.is_allowed(),
        "expected no errors, got: {}",
        verdict.message()
    );
}

fn task(command: Option<&[&str]>) -> Value {
    let mut process = json!({"args": ["x"]});
    if let Some(command) = command {
        process["command"] = json!(command);
    }
    json!({"spec": {"process": process}})
}

// ----------------------------------------------------------- spec manifests --

fn spec_manifests() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/spec");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/spec") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let value: Value = serde_yaml_ng::from_str(&text).expect("manifest is YAML");
        out.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            value,
        ));
    }
    assert!(
        out.len() >= 8,
        "expected the spec's manifests, found {}",
        out.len()
    );
    out
}

fn validate_manifest(value: &Value, old: Option<&Value>, ctx: &AdmissionContext<'_>) -> Verdict {
    match value["kind"].as_str() {
        Some("BatchSandbox") => validate_batch_sandbox(
            &batch(value.clone()),
            old.map(|o| batch(o.clone())).as_ref(),
            ctx,
        ),
        Some("Pool") => validate_pool(
            &pool(value.clone()),
            old.map(|o| pool(o.clone())).as_ref(),
            ctx,
        ),
        other => panic!("unexpected kind {other:?}"),
    }
}

#[test]
fn every_spec_manifest_is_accepted_while_its_dates_are_ahead() {
    let ctx = ctx_at("2026-01-15T00:00:00Z");
    for (name, value) in spec_manifests() {
        let verdict = validate_manifest(&value, None, &ctx);
        assert!(verdict.is_allowed(), "{name}: {}", verdict.message());
        assert!(
            verdict.warnings.is_empty(),
            "{name}: {:?}",
            verdict.warnings
        );
    }
}

#[test]
fn spec_manifests_with_passed_dates_are_rejected_on_create_only() {
    let ctx = ctx_at("2026-06-01T00:00:00Z");
    let mut rejected = Vec::new();
    for (name, value) in spec_manifests() {
        let verdict = validate_manifest(&value, None, &ctx);
        if !verdict.is_allowed() {
            let message = single_error(&verdict, "spec.expireTime");
            assert!(
                message.contains("2026-0") && message.contains("must be in the future"),
                "{message}"
            );
            assert!(
                message.contains("2026-06-01T00:00:00Z"),
                "the message says what now is: {message}"
            );
            rejected.push(name);
            // The same object as stored (an UPDATE that leaves expireTime alone) is fine.
            assert_allowed(&validate_manifest(&value, Some(&value), &ctx));
        }
    }
    rejected.sort();
    assert_eq!(rejected, ["expiring-batch.yaml", "tenant-batch.yaml"]);
}

// ------------------------------------------------------------------ replicas --

#[test]
fn replicas_must_lie_between_zero_and_the_maximum() {
    let message = single_error(&create(pooled(json!({"replicas": -1}))), "spec.replicas");
    assert_eq!(message, "spec.replicas: -1 must be >= 0");
    assert_allowed(&create(pooled(json!({"replicas": 0}))));
    assert_allowed(&create(pooled(json!({"replicas": 1000}))));
    let message = single_error(&create(pooled(json!({"replicas": 1001}))), "spec.replicas");
    assert!(
        message.starts_with("spec.replicas: 1001 must be <= 1000"),
        "{message}"
    );
}

#[test]
fn the_replica_maximum_is_configurable() {
    let ctx = AdmissionContext {
        max_replicas: 5,
        ..ctx()
    };
    let b = batch(pooled(json!({"replicas": 6})));
    assert_eq!(
        paths(&validate_batch_sandbox(&b, None, &ctx)),
        ["spec.replicas"]
    );
    let b = batch(pooled(json!({"replicas": 5})));
    assert_allowed(&validate_batch_sandbox(&b, None, &ctx));
}

#[test]
fn scale_requests_check_the_replica_bounds() {
    assert_allowed(&validate_batch_scale(20, Some(10), &ctx()));
    assert_allowed(&validate_batch_scale(0, Some(10), &ctx()));
    assert_eq!(
        single_error(
            &validate_batch_scale(1001, Some(10), &ctx()),
            "spec.replicas"
        ),
        validate_batch_scale(1001, None, &ctx()).errors[0].to_string()
    );
    assert_eq!(
        paths(&validate_batch_scale(-1, Some(1), &ctx())),
        ["spec.replicas"]
    );
    // An unchanged count is fine even if a lower maximum now forbids it.
    assert_allowed(&validate_batch_scale(5000, Some(5000), &ctx()));
}

#[test]
fn huge_replicas_are_rejected_without_expanding_every_shard() {
    let value = pooled(json!({"replicas": i32::MAX, "taskTemplate": task(Some(&[]))}));
    let started = std::time::Instant::now();
    let verdict = create(value);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(
        paths(&verdict),
        ["spec.replicas", "spec.taskTemplate.spec.process.command"]
    );
}

// ------------------------------------------------------- template / poolRef --

#[test]
fn exactly_one_of_template_and_pool_ref() {
    let both = templated(json!({"poolRef": "fast-pool"}));
    let message = single_error(&create(both), "spec.poolRef");
    assert!(
        message.contains("must not name a Pool together with spec.template"),
        "{message}"
    );

    let neither = json!({"metadata": {"name": "b"}, "spec": {"replicas": 1}});
    let message = single_error(&create(neither), "spec.template");
    assert!(
        message.starts_with("spec.template: <unset> must be set"),
        "{message}"
    );

    assert_allowed(&create(templated(json!({}))));
    assert_allowed(&create(pooled(json!({}))));
}

#[test]
fn template_needs_containers_with_names_and_images() {
    let no_spec = templated(json!({"template": {"metadata": {"labels": {"a": "b"}}}}));
    assert_eq!(
        single_error(&create(no_spec), "spec.template.spec.containers"),
        "spec.template.spec.containers: <unset> must list at least one container"
    );

    let empty = templated(json!({"template": {"spec": {"containers": []}}}));
    assert_eq!(paths(&create(empty)), ["spec.template.spec.containers"]);

    let bad = templated(json!({"template": {"spec": {"containers": [
        {"name": "", "image": "nginx"},
        {"name": "Main_1", "image": "nginx"},
        {"name": "ok", "image": "  "},
        {"name": "ok"},
        {"name": "fine", "image": "busybox"},
    ]}}}));
    let verdict = create(bad);
    assert_eq!(
        paths(&verdict),
        [
            "spec.template.spec.containers[0].name",
            "spec.template.spec.containers[1].name",
            "spec.template.spec.containers[2].image",
            "spec.template.spec.containers[3].name",
            "spec.template.spec.containers[3].image",
        ]
    );
    assert!(
        verdict.errors[3]
            .to_string()
            .contains("also used by containers[2]"),
        "{}",
        verdict.errors[3]
    );
    assert_eq!(
        verdict.errors[4].to_string(),
        "spec.template.spec.containers[3].image: <unset> must be set: a container needs an image"
    );
}

#[test]
fn pool_ref_must_be_an_object_name() {
    for bad in ["Fast_Pool", "", "-pool", "pool.", &"p".repeat(254)] {
        let verdict = create(pooled(json!({"poolRef": bad})));
        assert_eq!(paths(&verdict), ["spec.poolRef"], "{bad:?}");
    }
    for good in ["fast-pool", "a", "pool.v2", "0pool"] {
        assert_allowed(&create(pooled(json!({"poolRef": good}))));
    }
}

#[test]
fn pool_ref_cannot_change_or_appear_on_update() {
    let old = pooled(json!({"poolRef": "fast-pool", "replicas": 2}));
    assert_allowed(&update(
        old.clone(),
        pooled(json!({"poolRef": "fast-pool", "replicas": 7})),
    ));

    let message = single_error(
        &update(old.clone(), pooled(json!({"poolRef": "other-pool"}))),
        "spec.poolRef",
    );
    assert_eq!(
        message,
        "spec.poolRef: \"other-pool\" cannot change once set (was \"fast-pool\"), except from \"*\" to the Pool chosen for it; create a new BatchSandbox to use another pool"
    );

    // Switching to a template removes poolRef: that is a change too.
    let message = single_error(&update(old, templated(json!({}))), "spec.poolRef");
    assert!(
        message.starts_with("spec.poolRef: <unset> cannot change once set"),
        "{message}"
    );

    let from_template = templated(json!({}));
    let mut switched = pooled(json!({}));
    switched["metadata"] = from_template["metadata"].clone();
    let message = single_error(&update(from_template, switched), "spec.poolRef");
    assert!(message.contains("cannot be set on update"), "{message}");
}

/// `poolRef: "*"` with the template the chosen Pool's pods must fit.
fn selecting(spec: Value) -> Value {
    let mut value = templated(spec);
    value["spec"]["poolRef"] = json!("*");
    value
}

#[test]
fn pool_ref_star_needs_a_template() {
    assert_allowed(&create(selecting(json!({"replicas": 2}))));
    let message = single_error(&create(pooled(json!({"poolRef": "*"}))), "spec.template");
    assert_eq!(
        message,
        "spec.template: <unset> must be set when spec.poolRef is \"*\": the controller chooses a Pool whose pods fit it"
    );
    // The template is checked like any other.
    let empty = selecting(json!({"template": {"spec": {"containers": []}}}));
    assert_eq!(paths(&create(empty)), ["spec.template.spec.containers"]);
    // A "*" batch is pooled: no pod is created from the template, so it cannot be patched.
    let patched = selecting(json!({"shardPatches": [{"metadata": {"labels": {"x": "y"}}}]}));
    assert_eq!(paths(&create(patched)), ["spec.shardPatches"]);
}

#[test]
fn pool_ref_star_may_become_the_chosen_pool_and_nothing_else() {
    let waiting = selecting(json!({"replicas": 2}));
    let mut chosen = waiting.clone();
    chosen["spec"]["poolRef"] = json!("fast-pool");
    assert_allowed(&update(waiting.clone(), chosen.clone()));
    // Once chosen, the batch (template and all) is updated like any pooled batch.
    let mut scaled = chosen.clone();
    scaled["spec"]["replicas"] = json!(5);
    assert_allowed(&update(chosen.clone(), scaled));
    // The choice is final.
    let mut moved = chosen.clone();
    moved["spec"]["poolRef"] = json!("other-pool");
    let errors = update(chosen.clone(), moved).errors;
    assert!(
        errors.iter().any(|e| e.rule
            == Rule::PoolRefChanged {
                was: "\"fast-pool\"".into()
            }),
        "{errors:?}"
    );
    let mut back = chosen.clone();
    back["spec"]["poolRef"] = json!("*");
    assert_eq!(paths(&update(chosen.clone(), back)), ["spec.poolRef"]);
    // "*" cannot be dropped to make the batch non-pooled, nor can a template be added to a
    // batch created with a named pool.
    let mut dropped = waiting.clone();
    dropped["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("poolRef");
    assert_eq!(paths(&update(waiting, dropped)), ["spec.poolRef"]);
    let named = pooled(json!({"replicas": 2}));
    let mut with_template = chosen;
    with_template["metadata"] = named["metadata"].clone();
    assert_eq!(paths(&update(named, with_template)), ["spec.poolRef"]);
    // Creating a batch that looks chosen is refused: the controller makes that state.
    let message = single_error(
        &create(templated(json!({"poolRef": "fast-pool"}))),
        "spec.poolRef",
    );
    assert!(
        message.contains("spec.poolRef \"*\" with spec.template"),
        "{message}"
    );
}

#[test]
fn pooled_batches_cannot_set_shard_patches() {
    let value =
        pooled(json!({"replicas": 2, "shardPatches": [{"metadata": {"labels": {"x": "y"}}}]}));
    let message = single_error(&create(value), "spec.shardPatches");
    assert!(
        message.contains("must be empty for a pooled batch"),
        "{message}"
    );
    assert_allowed(&create(templated(
        json!({"replicas": 2, "shardPatches": [{"metadata": {"labels": {"x": "y"}}}]}),
    )));
}

#[test]
fn non_pooled_batch_names_must_fit_a_label_value() {
    let mut long = templated(json!({}));
    long["metadata"]["name"] = json!("b".repeat(64));
    let message = single_error(&create(long.clone()), "metadata.name");
    assert!(message.contains(names::LABEL_BATCH_NAME), "{message}");
    long["metadata"]["name"] = json!("b".repeat(63));
    assert_allowed(&create(long));
    let mut pooled_long = pooled(json!({}));
    pooled_long["metadata"]["name"] = json!("b".repeat(100));
    assert_allowed(&create(pooled_long));
}

// ------------------------------------------------------------- shard patches --

#[test]
fn patch_lists_are_no_longer_than_replicas() {
    let patches = json!([task(Some(&["a"])), task(Some(&["b"])), task(Some(&["c"]))]);
    assert_allowed(&create(pooled(
        json!({"replicas": 3, "shardTaskPatches": patches}),
    )));
    let message = single_error(
        &create(pooled(json!({"replicas": 2, "shardTaskPatches": patches}))),
        "spec.shardTaskPatches",
    );
    assert_eq!(
        message,
        "spec.shardTaskPatches: [3 entries] has 3 entries, more than spec.replicas (2): entry i applies to shard i"
    );

    let pod_patches = json!([{}, {}]);
    assert_eq!(
        paths(&create(templated(
            json!({"replicas": 1, "shardPatches": pod_patches})
        ))),
        ["spec.shardPatches"]
    );
    assert_allowed(&create(templated(
        json!({"replicas": 2, "shardPatches": pod_patches}),
    )));
}

#[test]
fn scaling_below_the_patch_count_is_allowed_with_a_warning() {
    let patches = json!([task(Some(&["a"])), task(Some(&["b"])), task(Some(&["c"]))]);
    let old = pooled(json!({"replicas": 3, "shardTaskPatches": patches}));
    let verdict = update(
        old.clone(),
        pooled(json!({"replicas": 1, "shardTaskPatches": patches})),
    );
    assert_allowed(&verdict);
    assert!(
        verdict
            .warnings
            .iter()
            .any(|w| w.starts_with("spec.shardTaskPatches has 3 entries but spec.replicas is 1")),
        "{:?}",
        verdict.warnings
    );

    // Editing the list while it is too long is not a scale-down: denied.
    let edited = json!([task(Some(&["a"])), task(Some(&["b"])), task(Some(&["z"]))]);
    let verdict = update(
        old,
        pooled(json!({"replicas": 1, "shardTaskPatches": edited})),
    );
    assert_eq!(paths(&verdict), ["spec.shardTaskPatches"]);
}

#[test]
fn shard_patches_must_apply_to_the_template() {
    let value = templated(json!({"replicas": 3, "shardPatches": [
        {"spec": {"containers": [{"name": "main", "image": "nginx:1.27"}]}},
        {"spec": {"containers": "nope"}},
        {"spec": {"containers": [{"name": "extra"}]}},
    ]}));
    let verdict = create(value);
    assert_eq!(
        paths(&verdict),
        ["spec.shardPatches[1]", "spec.shardPatches[2]"]
    );
    assert!(
        verdict.errors[0]
            .to_string()
            .contains("is not a valid pod template patch"),
        "{}",
        verdict.errors[0]
    );
    let message = verdict.errors[1].to_string();
    assert!(
        message.contains("leaves the pod of shard 2 invalid")
            && message.contains("containers[1].image"),
        "{message}"
    );
}

#[test]
fn shard_patches_are_not_blamed_for_the_template_own_problems() {
    let value = templated(json!({
        "replicas": 1,
        "template": {"spec": {"containers": [{"name": "main"}]}},
        "shardPatches": [{"metadata": {"labels": {"x": "y"}}}],
    }));
    assert_eq!(
        paths(&create(value)),
        ["spec.template.spec.containers[0].image"]
    );
}

// ---------------------------------------------------------------- task rules --

#[test]
fn spec_task_examples_are_accepted() {
    // heterogeneous-tasks: every shard patched; test-runners: two patches, no template.
    let tasks = json!({"replicas": 10, "shardTaskPatches": [task(Some(&["pytest"])), task(Some(&["pytest"]))]});
    assert_allowed(&create(pooled(tasks)));
    let rl = json!({"replicas": 100, "taskTemplate": task(Some(&["python"]))});
    assert_allowed(&create(pooled(rl)));
}

#[test]
fn a_template_without_command_names_every_shard_that_uses_it() {
    let value = pooled(
        json!({"replicas": 10, "taskTemplate": task(None), "shardTaskPatches": [task(Some(&["a"])), task(Some(&["b"]))]}),
    );
    let message = single_error(&create(value), "spec.taskTemplate.spec.process.command");
    assert_eq!(
        message,
        "spec.taskTemplate.spec.process.command: <unset> must be a non-empty command whose first element names the executable, for shards 2-9 after taskTemplate and shardTaskPatches are merged"
    );
}

#[test]
fn a_patch_that_leaves_its_shard_without_command_is_named() {
    let env_only = json!({"spec": {"process": {"env": [{"name": "A", "value": "1"}]}}});
    let value = pooled(
        json!({"replicas": 4, "taskTemplate": task(None), "shardTaskPatches": [task(Some(&["a"])), env_only, {}]}),
    );
    let verdict = create(value);
    assert_eq!(
        paths(&verdict),
        [
            "spec.shardTaskPatches[1].spec.process.command",
            "spec.taskTemplate.spec.process.command"
        ]
    );
    assert!(
        verdict.errors[0].to_string().contains("for shard 1 after"),
        "{}",
        verdict.errors[0]
    );
    // Shard 2's patch has no spec, so it runs the bare template, like shard 3.
    assert!(
        verdict.errors[1]
            .to_string()
            .contains("for shards 2-3 after"),
        "{}",
        verdict.errors[1]
    );
}

#[test]
fn empty_or_blank_commands_are_rejected_and_a_patch_command_fixes_the_template() {
    for bad in [json!([]), json!([""]), json!(["  ", "x"])] {
        let value =
            pooled(json!({"replicas": 1, "taskTemplate": {"spec": {"process": {"command": bad}}}}));
        assert_eq!(
            paths(&create(value)),
            ["spec.taskTemplate.spec.process.command"],
            "{bad}"
        );
    }
    let value = pooled(
        json!({"replicas": 2, "taskTemplate": task(Some(&[])), "shardTaskPatches": [task(Some(&["a"])), task(Some(&["b"]))]}),
    );
    let verdict = create(value);
    assert_allowed(&verdict);
    assert!(
        verdict
            .warnings
            .iter()
            .any(|w| w.contains("if the batch scaled up")),
        "{:?}",
        verdict.warnings
    );
}

#[test]
fn a_patch_without_process_and_no_template_has_no_command() {
    let value =
        pooled(json!({"replicas": 2, "shardTaskPatches": [{"spec": {"timeoutSeconds": 5}}]}));
    assert_eq!(
        paths(&create(value)),
        ["spec.shardTaskPatches[0].spec.process.command"]
    );
    let value = pooled(json!({"replicas": 2, "shardTaskPatches": [{}]}));
    assert_allowed(&create(value));
}

#[test]
fn env_names_are_valid_and_unique_per_list() {
    let env = json!([
        {"name": "GOOD_1"}, {"name": "1BAD"}, {"name": "A B"}, {"name": ""}, {"name": "GOOD_1"}, {"name": "-x.y_z"},
    ]);
    let value = pooled(
        json!({"replicas": 1, "taskTemplate": {"spec": {"process": {"command": ["run"], "env": env}}}}),
    );
    let verdict = create(value);
    let base = "spec.taskTemplate.spec.process.env";
    assert_eq!(
        paths(&verdict),
        [
            format!("{base}[1].name"),
            format!("{base}[2].name"),
            format!("{base}[3].name"),
            format!("{base}[4].name")
        ]
    );
    assert!(
        verdict.errors[3]
            .to_string()
            .contains("also used by env[0]"),
        "{}",
        verdict.errors[3]
    );

    // The same name in the template and a patch is an override, not a duplicate.
    let value = pooled(json!({
        "replicas": 1,
        "taskTemplate": {"spec": {"process": {"command": ["run"], "env": [{"name": "A"}]}}},
        "shardTaskPatches": [{"spec": {"process": {"env": [{"name": "A"}, {"name": "9"}]}}}],
    }));
    assert_eq!(
        paths(&create(value)),
        ["spec.shardTaskPatches[0].spec.process.env[1].name"]
    );
}

#[test]
fn timeouts_must_be_positive() {
    let value = pooled(json!({
        "replicas": 2,
        "taskTemplate": {"spec": {"process": {"command": ["run"]}, "timeoutSeconds": 0}},
        "shardTaskPatches": [{"spec": {"timeoutSeconds": -5}}, {"spec": {"timeoutSeconds": 1}}],
    }));
    let verdict = create(value);
    assert_eq!(
        paths(&verdict),
        [
            "spec.taskTemplate.spec.timeoutSeconds",
            "spec.shardTaskPatches[0].spec.timeoutSeconds"
        ]
    );
    assert_eq!(
        verdict.errors[0].to_string(),
        "spec.taskTemplate.spec.timeoutSeconds: 0 must be > 0"
    );
}

// --------------------------------------------------------------- expireTime --

#[test]
fn expire_time_must_be_a_time_and_reports_with_the_other_errors() {
    let (decoded, errors) = decode_batch_sandbox(pooled(
        json!({"replicas": -1, "expireTime": "next tuesday"}),
    ));
    let decoded = decoded.expect("the rest of the object still decodes");
    let mut verdict = validate_batch_sandbox(&decoded, None, &ctx());
    verdict.errors.splice(0..0, errors);
    assert_eq!(paths(&verdict), ["spec.expireTime", "spec.replicas"]);
    assert!(
        verdict.errors[0]
            .to_string()
            .starts_with("spec.expireTime: \"next tuesday\" must be an RFC 3339 time"),
        "{}",
        verdict.errors[0]
    );

    let (_, errors) = decode_batch_sandbox(pooled(json!({"expireTime": 12})));
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].to_string().contains("not a string"),
        "{}",
        errors[0]
    );
}

#[test]
fn expire_time_in_the_past_is_rejected_on_create_and_warned_about_on_update() {
    let past = pooled(json!({"expireTime": "2026-05-31T23:59:59Z"}));
    let message = single_error(&create(past.clone()), "spec.expireTime");
    assert_eq!(
        message,
        "spec.expireTime: \"2026-05-31T23:59:59Z\" must be in the future when the object is created (it is now 2026-06-01T00:00:00Z)"
    );
    let precise = ctx_at("2026-06-01T00:00:00.123456789Z");
    let verdict = validate_batch_sandbox(&batch(past.clone()), None, &precise);
    assert!(
        verdict
            .message()
            .ends_with("(it is now 2026-06-01T00:00:00Z)"),
        "times are shown to the second: {}",
        verdict.message()
    );
    assert_allowed(&create(pooled(
        json!({"expireTime": "2026-06-01T00:00:01Z"}),
    )));

    let future = pooled(json!({"expireTime": "2026-12-31T23:59:59Z"}));
    let verdict = update(future, past);
    assert_allowed(&verdict);
    assert!(
        verdict
            .warnings
            .iter()
            .any(|w| w.contains("expires at once")),
        "{:?}",
        verdict.warnings
    );
}

// ------------------------------------------------------------------ policies --

#[test]
fn policy_annotations_must_name_loadable_policies() {
    let mut value = pooled(json!({}));
    value["metadata"]["annotations"] = json!({
        "policy.sandbox.opensandbox.io/expiry": "grace-period",
        "policy.sandbox.opensandbox.io/shard-tasks": "no-such-policy",
        "unrelated.example.com/expiry": "whatever",
    });
    let message = single_error(
        &create(value),
        "metadata.annotations[policy.sandbox.opensandbox.io/shard-tasks]",
    );
    assert_eq!(
        message,
        "metadata.annotations[policy.sandbox.opensandbox.io/shard-tasks]: \"no-such-policy\" names no loadable policy"
    );
}

#[test]
fn policy_annotations_for_unknown_or_foreign_decisions_only_warn() {
    let mut value = pooled(json!({}));
    value["metadata"]["annotations"] = json!({
        "policy.sandbox.opensandbox.io/pool-sizing": "missing",
        "policy.sandbox.opensandbox.io/colour": "missing",
    });
    let verdict = create(value);
    assert_allowed(&verdict);
    assert_eq!(verdict.warnings.len(), 2, "{:?}", verdict.warnings);

    let mut value = pool_with(json!({"bufferMax": 2, "bufferMin": 1, "poolMax": 5, "poolMin": 0}));
    value["metadata"]["annotations"] =
        json!({"policy.sandbox.opensandbox.io/pool-sizing": "missing"});
    let verdict = validate_pool(&pool(value), None, &ctx());
    assert_eq!(
        paths(&verdict),
        ["metadata.annotations[policy.sandbox.opensandbox.io/pool-sizing]"]
    );
}

// -------------------------------------------------------- verdict mechanics --

#[test]
fn every_failing_field_is_listed_at_once() {
    let mut value = templated(json!({
        "replicas": -3,
        "poolRef": "Bad_Pool",
        "template": {"spec": {"containers": [{"name": "main"}]}},
        "taskTemplate": {"spec": {"process": {"command": [], "env": [{"name": "1X"}]}, "timeoutSeconds": 0}},
        "expireTime": "2020-01-01T00:00:00Z",
    }));
    value["metadata"]["annotations"] = json!({"policy.sandbox.opensandbox.io/expiry": "nope"});
    let verdict = create(value);
    let mut got = paths(&verdict);
    got.sort();
    assert_eq!(
        got,
        [
            "metadata.annotations[policy.sandbox.opensandbox.io/expiry]",
            "spec.expireTime",
            "spec.poolRef",
            "spec.poolRef",
            "spec.replicas",
            "spec.taskTemplate.spec.process.env[0].name",
            "spec.taskTemplate.spec.timeoutSeconds",
            "spec.template.spec.containers[0].image",
        ]
    );
    let message = verdict.message();
    for error in &verdict.errors {
        assert!(message.contains(&error.to_string()));
    }
    assert_eq!(message.matches("; ").count(), verdict.errors.len() - 1);
}

#[test]
fn objects_being_deleted_are_not_validated() {
    let mut value = pooled(json!({"replicas": -1}));
    value["metadata"]["deletionTimestamp"] = json!("2026-06-01T00:00:00Z");
    assert_allowed(&create(value.clone()));
    let mut p = pool_with(json!({"bufferMax": 1, "bufferMin": 5, "poolMax": 1, "poolMin": 0}));
    p["metadata"]["deletionTimestamp"] = json!("2026-06-01T00:00:00Z");
    assert_allowed(&validate_pool(&pool(p), None, &ctx()));
}

#[test]
fn updates_ratchet_errors_the_stored_object_already_had() {
    let ctx = AdmissionContext {
        max_replicas: 10,
        ..ctx()
    };
    let old = batch(pooled(json!({"replicas": 50})));
    let mut relabelled = old.clone();
    relabelled.metadata.annotations = Some(
        [(
            "sandbox.opensandbox.io/endpoints".to_string(),
            "[]".to_string(),
        )]
        .into(),
    );
    let verdict = validate_batch_sandbox(&relabelled, Some(&old), &ctx);
    assert_allowed(&verdict);
    assert!(
        verdict
            .warnings
            .iter()
            .any(|w| w.starts_with("spec.replicas: 50 must be <= 10")),
        "{:?}",
        verdict.warnings
    );

    let mut grown = old.clone();
    grown.spec.replicas = 51;
    assert_eq!(
        paths(&validate_batch_sandbox(&grown, Some(&old), &ctx)),
        ["spec.replicas"]
    );
    let mut shrunk = old.clone();
    shrunk.spec.replicas = 10;
    assert!(
        validate_batch_sandbox(&shrunk, Some(&old), &ctx)
            .warnings
            .is_empty()
    );
}

#[test]
fn long_values_are_cut_in_messages() {
    let long = "X".repeat(500);
    let value = pooled(
        json!({"replicas": 1, "taskTemplate": {"spec": {"process": {"command": ["run"], "env": [{"name": format!("1{long}")}]}}}}),
    );
    let verdict = create(value);
    assert!(verdict.errors[0].value.chars().count() <= MAX_VALUE_CHARS + 1);
    assert!(verdict.errors[0].value.ends_with('…'));
}

// ---------------------------------------------------------------------- Pool --

#[test]
fn pool_capacity_fields_are_non_negative() {
    let value = pool_with(json!({"bufferMax": -1, "bufferMin": -2, "poolMax": 5, "poolMin": -4}));
    let verdict = validate_pool(&pool(value), None, &ctx());
    assert_eq!(
        paths(&verdict),
        [
            "spec.capacitySpec.bufferMax",
            "spec.capacitySpec.bufferMin",
            "spec.capacitySpec.poolMin"
        ]
    );
    assert_eq!(
        verdict.errors[0].to_string(),
        "spec.capacitySpec.bufferMax: -1 must be >= 0"
    );
}

#[test]
fn pool_minimums_must_not_exceed_maximums() {
    let value = pool_with(json!({"bufferMax": 20, "bufferMin": 30, "poolMax": 10, "poolMin": 11}));
    let verdict = validate_pool(&pool(value), None, &ctx());
    assert_eq!(
        verdict
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "spec.capacitySpec.bufferMin: 30 must be <= bufferMax (20)",
            "spec.capacitySpec.poolMin: 11 must be <= poolMax (10)"
        ]
    );
}

#[test]
fn pool_template_needs_containers() {
    let mut value = pool_with(json!({"bufferMax": 2, "bufferMin": 1, "poolMax": 5, "poolMin": 0}));
    value["spec"]["template"] = json!({"spec": {"containers": []}});
    assert_eq!(
        paths(&validate_pool(&pool(value.clone()), None, &ctx())),
        ["spec.template.spec.containers"]
    );
    value["spec"]["template"] = json!({"spec": {"containers": [{"name": "x"}]}});
    assert_eq!(
        paths(&validate_pool(&pool(value), None, &ctx())),
        ["spec.template.spec.containers[0].image"]
    );
}

#[test]
fn pool_names_must_fit_a_label_value() {
    let mut value = pool_with(json!({"bufferMax": 2, "bufferMin": 1, "poolMax": 5, "poolMin": 0}));
    value["metadata"]["name"] = json!("p".repeat(64));
    let message = single_error(&validate_pool(&pool(value), None, &ctx()), "metadata.name");
    assert!(message.contains(names::LABEL_POOL_NAME), "{message}");
}

#[test]
fn suspicious_pools_get_warnings_not_denials() {
    let cases = [
        (
            json!({"bufferMax": 60, "bufferMin": 5, "poolMax": 50, "poolMin": 10}),
            "bufferMax (60) > poolMax (50)",
        ),
        (
            json!({"bufferMax": 60, "bufferMin": 55, "poolMax": 50, "poolMin": 10}),
            "bufferMin (55) > poolMax (50)",
        ),
        (
            json!({"bufferMax": 0, "bufferMin": 0, "poolMax": 0, "poolMin": 0}),
            "poolMax is 0",
        ),
        (
            json!({"bufferMax": 0, "bufferMin": 0, "poolMax": 5, "poolMin": 2}),
            "bufferMax is 0",
        ),
    ];
    for (capacity, expected) in cases {
        let verdict = validate_pool(&pool(pool_with(capacity.clone())), None, &ctx());
        assert_allowed(&verdict);
        assert!(
            verdict.warnings.iter().any(|w| w.contains(expected)),
            "{capacity}: {:?}",
            verdict.warnings
        );
    }
}

fn pool_with_strategies(scale: Value, update: Value) -> Pool {
    let mut value = pool_with(json!({"bufferMin": 1, "bufferMax": 2, "poolMin": 0, "poolMax": 5}));
    let spec = value["spec"].as_object_mut().unwrap();
    if !scale.is_null() {
        spec.insert("scaleStrategy".into(), json!({"maxUnavailable": scale}));
    }
    if !update.is_null() {
        spec.insert("updateStrategy".into(), json!({"maxUnavailable": update}));
    }
    pool(value)
}

#[test]
fn max_unavailable_is_a_non_negative_count_or_a_percentage_up_to_100() {
    for good in [
        json!(0),
        json!(3),
        json!("0%"),
        json!("25%"),
        json!("100%"),
        Value::Null,
    ] {
        assert_allowed(&validate_pool(
            &pool_with_strategies(good.clone(), good),
            None,
            &ctx(),
        ));
    }
    for bad in [
        json!(-1),
        json!("101%"),
        json!("25"),
        json!("x%"),
        json!("-5%"),
        json!(""),
    ] {
        let verdict = validate_pool(
            &pool_with_strategies(bad.clone(), bad.clone()),
            None,
            &ctx(),
        );
        assert_eq!(
            paths(&verdict),
            [
                "spec.scaleStrategy.maxUnavailable",
                "spec.updateStrategy.maxUnavailable"
            ],
            "both fields named at once for {bad}"
        );
        let message = verdict.errors[0].to_string();
        assert!(message.contains(&bad.to_string()), "{message}");
        assert!(
            message.contains("percentage from \"0%\" to \"100%\""),
            "{message}"
        );
    }
}

#[test]
fn pause_true_is_refused_naming_the_field_and_false_is_fine() {
    let message = single_error(&create(pooled(json!({"pause": true}))), "spec.pause");
    assert!(message.contains("cannot pause or resume"), "{message}");
    assert!(message.contains("no image snapshots"), "{message}");
    assert_allowed(&create(pooled(json!({"pause": false}))));
    // Refused together with the other failing fields.
    let verdict = create(pooled(json!({"pause": true, "replicas": -1})));
    assert_eq!(paths(&verdict), ["spec.replicas", "spec.pause"]);
}

fn with_annotations(mut value: Value, annotations: Value) -> Value {
    value["metadata"]["annotations"] = annotations;
    value
}

#[test]
fn alloc_release_may_name_only_the_batch_own_pods() {
    let ledger = r#"{"pods":["p-a","p-b"],"poolRef":"fast-pool"}"#;
    let held = with_annotations(
        pooled(json!({"replicas": 2})),
        json!({names::ANNOTATION_ALLOC_STATUS: ledger}),
    );
    let asks = |request: &str| {
        with_annotations(
            pooled(json!({"replicas": 2})),
            json!({names::ANNOTATION_ALLOC_STATUS: ledger, names::ANNOTATION_ALLOC_RELEASE: request}),
        )
    };
    let path = format!("metadata.annotations[{}]", names::ANNOTATION_ALLOC_RELEASE);
    assert_allowed(&update(held.clone(), asks(r#"{"pods":["p-b"]}"#)));
    let message = single_error(
        &update(
            held.clone(),
            asks(r#"{"pods":["p-b","other-x","other-y"]}"#),
        ),
        &path,
    );
    assert!(message.contains(r#""other-x", "other-y""#), "{message}");
    assert!(!message.contains(r#"pod(s) "p-b""#), "{message}");
    let message = single_error(&update(held.clone(), asks("p-b")), &path);
    assert!(message.contains("must be JSON"), "{message}");

    // Once carried out, the request stays valid: the pod moved from the ledger to alloc-released,
    // and an unchanged request is not checked again.
    let done = with_annotations(
        pooled(json!({"replicas": 2})),
        json!({
            names::ANNOTATION_ALLOC_STATUS: r#"{"pods":["p-a",""],"poolRef":"fast-pool"}"#,
            names::ANNOTATION_ALLOC_RELEASE: r#"{"pods":["p-b"]}"#,
            names::ANNOTATION_ALLOC_RELEASED: r#"{"pods":["p-b"]}"#,
        }),
    );
    assert_allowed(&update(asks(r#"{"pods":["p-b"]}"#), done.clone()));
    assert_allowed(&create(done));
}

#[test]
fn the_user_writable_annotations_are_listed() {
    assert_eq!(
        names::USER_WRITABLE_ANNOTATIONS,
        [names::ANNOTATION_ALLOC_RELEASE]
    );
}

#[test]
fn recycle_strategy_type_is_one_of_three() {
    for allowed in ["Delete", "Restart", "Noop"] {
        let mut value =
            pool_with(json!({"bufferMin": 1, "bufferMax": 2, "poolMin": 0, "poolMax": 4}));
        value["spec"]["recycleStrategy"] = json!({"type": allowed});
        let (decoded, errors) = decode_pool(value);
        assert!(errors.is_empty(), "{allowed}: {errors:?}");
        assert_allowed(&validate_pool(&decoded.expect("decodes"), None, &ctx()));
    }
    let mut value = pool_with(json!({"bufferMin": 1, "bufferMax": 2, "poolMin": 0, "poolMax": 4}));
    value["spec"]["recycleStrategy"] = json!({"type": "Reuse"});
    let (decoded, errors) = decode_pool(value);
    assert!(decoded.is_some(), "the rest of the object is still checked");
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        ["spec.recycleStrategy.type: \"Reuse\" must be one of Delete, Restart, Noop"]
    );
}

#[test]
fn unreadable_objects_become_field_errors() {
    let (decoded, errors) =
        decode_pool(json!({"metadata": {"name": "p"}, "spec": {"capacitySpec": "big"}}));
    assert!(decoded.is_none());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .starts_with("spec: <object> cannot be read as a Pool"),
        "{}",
        errors[0]
    );
    let (decoded, errors) = decode_batch_sandbox(json!({"spec": {"replicas": "many"}}));
    assert!(decoded.is_none() && errors.len() == 1);
}

#[test]
fn name_helpers() {
    assert!(
        is_dns_label("a-1")
            && !is_dns_label("a_1")
            && !is_dns_label(&"a".repeat(64))
            && !is_dns_label("a-")
    );
    assert!(is_dns_subdomain("a.b-c.d") && !is_dns_subdomain("a..b") && !is_dns_subdomain("A"));
    assert!(
        is_env_name("_A")
            && is_env_name(".x-y")
            && !is_env_name("9")
            && !is_env_name("A=B")
            && !is_env_name("")
    );
    assert_eq!(shard_list(&[0, 1, 2, 5, 7, 8]), "shards 0-2, 5, 7-8");
    assert_eq!(shard_list(&[4]), "shard 4");
    let many: Vec<usize> = (0..40).step_by(2).collect();
    assert!(shard_list(&many).ends_with(", ..."));
}

// ---------------------------------------------------------------- properties --

fn arb_task() -> impl Strategy<Value = Value> {
    let command = prop::option::of(prop::collection::vec(
        prop::sample::select(vec!["", " ", "run", "py"]),
        0..3,
    ));
    (
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.8),
        command,
    )
        .prop_map(|(has_spec, has_process, command)| {
            if !has_spec {
                return json!({});
            }
            if !has_process {
                return json!({"spec": {"timeoutSeconds": 3}});
            }
            let mut process = json!({"args": ["x"]});
            if let Some(command) = command {
                process["command"] = json!(command);
            }
            json!({"spec": {"process": process}})
        })
}

proptest! {
    /// Pool errors are exactly the capacity rules, evaluated independently here.
    #[test]
    fn pool_errors_match_the_capacity_rules(bmax in -3i32..30, bmin in -3i32..30, pmax in -3i32..30, pmin in -3i32..30) {
        let value = pool_with(json!({"bufferMax": bmax, "bufferMin": bmin, "poolMax": pmax, "poolMin": pmin}));
        let verdict = validate_pool(&pool(value), None, &ctx());
        let mut expected = Vec::new();
        for (name, v) in [("bufferMax", bmax), ("bufferMin", bmin), ("poolMax", pmax), ("poolMin", pmin)] {
            if v < 0 { expected.push(format!("spec.capacitySpec.{name}")); }
        }
        if bmin > bmax { expected.push("spec.capacitySpec.bufferMin".into()); }
        if pmin > pmax { expected.push("spec.capacitySpec.poolMin".into()); }
        prop_assert_eq!(paths(&verdict), expected);
        for error in &verdict.errors {
            let prefix = format!("{}: ", error.path);
            prop_assert!(error.to_string().starts_with(&prefix));
        }
    }

    /// The command rule agrees with expanding every shard through `sandbox_decisions::tasks`, the merge the
    /// controller runs: a batch is denied for commands exactly when some shard that has a task has
    /// no runnable command.
    #[test]
    fn command_rule_agrees_with_full_expansion(
        replicas in 0i32..30,
        template in prop::option::of(arb_task()),
        patches in prop::collection::vec(arb_task(), 0..6),
    ) {
        let patches: Vec<Value> = patches.into_iter().take(replicas as usize).collect();
        let mut spec = json!({"replicas": replicas, "shardTaskPatches": patches});
        if let Some(t) = &template { spec["taskTemplate"] = t.clone(); }
        let b = batch(pooled(spec));
        let verdict = validate_batch_sandbox(&b, None, &ctx());
        let shards = tasks::shard_tasks(replicas as usize, b.spec.task_template.as_ref(), &b.spec.shard_task_patches);
        let some_shard_lacks_command = shards.iter().flatten().any(|t| !is_runnable(t.process.as_ref().and_then(|p| p.command.as_ref())));
        let command_errors = verdict.errors.iter().filter(|e| matches!(e.rule, Rule::EmptyCommand { .. })).count();
        prop_assert_eq!(some_shard_lacks_command, command_errors > 0, "{}", verdict.message());
        prop_assert_eq!(verdict.errors.len(), command_errors, "only command rules can fail here: {}", verdict.message());
    }

    /// Arbitrary JSON never panics the decoders or the rules.
    #[test]
    fn arbitrary_json_never_panics(value in arb_json()) {
        let wrapped = json!({"metadata": {"name": "x"}, "spec": value.clone()});
        if let (Some(b), _) = decode_batch_sandbox(wrapped.clone()) {
            let _ = validate_batch_sandbox(&b, Some(&b), &ctx());
            let _ = validate_batch_sandbox(&b, None, &ctx());
        }
        if let (Some(p), _) = decode_pool(wrapped) {
            let _ = validate_pool(&p, None, &ctx());
        }
        let _ = decode_batch_sandbox(value.clone());
        let _ = decode_pool(value);
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-zA-Z0-9 :-]{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "replicas",
            "poolRef",
            "template",
            "expireTime",
            "2026-01-01T00:00:00Z"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        let keys = prop::sample::select(vec![
            "replicas",
            "poolRef",
            "template",
            "spec",
            "containers",
            "name",
            "image",
            "expireTime",
            "taskTemplate",
            "shardTaskPatches",
            "shardPatches",
            "process",
            "command",
            "env",
            "capacitySpec",
            "bufferMin",
            "timeoutSeconds",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(keys, inner, 0..5).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

/// The position of `rule`'s variant. A new variant does not compile until it is listed here,
/// and then the test below fails until it is in the catalogue (and so in the docs).
fn variant_index(rule: &Rule) -> usize {
    match rule {
        Rule::Negative => 0,
        Rule::AboveMaxReplicas { .. } => 1,
        Rule::AboveOther { .. } => 2,
        Rule::NotPositive => 3,
        Rule::BothTemplateAndPoolRef => 4,
        Rule::NeitherTemplateNorPoolRef => 5,
        Rule::PoolSelectionWithoutTemplate => 6,
        Rule::NoContainers => 7,
        Rule::NotDnsLabel => 8,
        Rule::DuplicateContainerName { .. } => 9,
        Rule::MissingImage => 10,
        Rule::NotObjectName => 11,
        Rule::PoolRefChanged { .. } => 12,
        Rule::PoolRefAdded => 13,
        Rule::ShardPatchesOnPooledBatch => 14,
        Rule::MoreEntriesThanReplicas { .. } => 15,
        Rule::BadShardPatch { .. } => 16,
        Rule::ShardPatchBreaksPod { .. } => 17,
        Rule::EmptyCommand { .. } => 18,
        Rule::BadEnvName => 19,
        Rule::DuplicateEnvName { .. } => 20,
        Rule::BadTime { .. } => 21,
        Rule::ExpireTimeInPast { .. } => 22,
        Rule::UnknownPolicy => 23,
        Rule::NameTooLongForLabel { .. } => 24,
        Rule::Unreadable { .. } => 25,
        Rule::BadMaxUnavailable { .. } => 26,
        Rule::PauseUnsupported => 27,
        Rule::BadPodList { .. } => 28,
        Rule::ReleasesForeignPods { .. } => 29,
        Rule::BadRequest(_) => 30,
        Rule::ControllerOwned { .. } => 31,
        Rule::NotOneOf { .. } => 32,
    }
}

#[test]
fn the_catalogue_has_every_rule_once() {
    let indices: Vec<usize> = Rule::catalogue().iter().map(variant_index).collect();
    assert_eq!(indices, (0..=32).collect::<Vec<_>>());
}

/// The message table between the markers in docs/admission.md.
fn message_table() -> String {
    let mut table = String::from("| rule | message (after `<path>: <value>`) |\n| --- | --- |\n");
    for rule in Rule::catalogue() {
        let name = format!("{rule:?}");
        let name = name
            .split([' ', '(', '{'])
            .next()
            .unwrap_or_default()
            .to_string();
        table.push_str(&format!(
            "| `{name}` | {} |\n",
            rule.to_string().replace('|', "\\|")
        ));
    }
    table
}

#[test]
fn docs_admission_md_shows_every_message() {
    const BEGIN: &str = "<!-- rule messages: generated from Rule::catalogue() -->\n";
    const END: &str = "<!-- end of rule messages -->";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/admission.md");
    let text = std::fs::read_to_string(&path).expect("reading docs/admission.md");
    let (Some(start), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        panic!("docs/admission.md lacks the rule message markers");
    };
    let fresh = format!(
        "{}{BEGIN}{}{}",
        &text[..start],
        message_table(),
        &text[end..]
    );
    if std::env::var_os("SANDBOX_UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("writing docs/admission.md");
    }
    assert!(
        text == fresh,
        "docs/admission.md's message table is stale: run `SANDBOX_UPDATE_DOCS=1 cargo test -p sandbox-controller --lib admission`"
    );
}

#[test]
fn a_template_task_executor_is_admitted_with_a_warning_that_it_is_replaced() {
    let containers = json!([
        {"name": "main", "image": "nginx:latest"},
        {"name": "task-executor", "image": "someone-elses/executor:1"}
    ]);
    let verdict = validate_batch_sandbox(
        &batch(templated(
            json!({"replicas": 1, "template": {"spec": {"containers": containers}}}),
        )),
        None,
        &ctx(),
    );
    assert_allowed(&verdict);
    assert!(
        verdict
            .warnings
            .iter()
            .any(|w| w.contains("spec.template.spec.containers")
                && w.contains("\"task-executor\" is reserved")),
        "{:?}",
        verdict.warnings
    );
    let mut pool_value =
        pool_with(json!({"bufferMax": 2, "bufferMin": 1, "poolMax": 5, "poolMin": 1}));
    pool_value["spec"]["template"]["spec"]["initContainers"] =
        json!([{"name": "task-executor", "image": "x", "restartPolicy": "Always"}]);
    let verdict = validate_pool(&pool(pool_value), None, &ctx());
    assert_allowed(&verdict);
    assert!(
        verdict
            .warnings
            .iter()
            .any(|w| w.contains("spec.template.spec.initContainers") && w.contains("reserved")),
        "{:?}",
        verdict.warnings
    );
    let plain = validate_pool(
        &pool(pool_with(
            json!({"bufferMax": 2, "bufferMin": 1, "poolMax": 5, "poolMin": 1}),
        )),
        None,
        &ctx(),
    );
    assert!(
        plain.warnings.iter().all(|w| !w.contains("reserved")),
        "{:?}",
        plain.warnings
    );
}
