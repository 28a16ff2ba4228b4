//! Issue 5: the validating admission webhook against the real apiserver. Each test runs its own
//! webhook, registered for its own namespace only, so tests run in parallel without seeing each
//! other's webhooks. No controller runs here: a rejected object must simply never exist.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use sandbox_controller::webhook::{
    Limits, Registration, RuleSettings, Target, TlsSettings, Webhook, WebhookConfig, default_sans,
    registration,
};
use serde_json::Value;

use crate::harness::{
    self, TestEnv, in_namespace, spec_manifest, spec_manifest_names, with_future_expire,
};

/// The namespace every test registration excludes, as the controller's own would be.
const CONTROLLER_NAMESPACE: &str = "opensandbox-system";
const DENIED: &str = "admission webhook \"validate.sandbox.opensandbox.io\" denied the request";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A webhook served in this process, on a runtime of its own (kubectl calls block the test's
/// thread while the apiserver calls the webhook), registered for one namespace.
struct ScopedWebhook {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _certs: tempfile::TempDir,
}

impl ScopedWebhook {
    async fn start(env: &TestEnv, max_replicas: i32, policies: &[&str]) -> Self {
        let certs = tempfile::tempdir().expect("cert dir");
        let name = Registration::scoped_name(registration::DEFAULT_CONFIGURATION_NAME, &env.ns);
        let registration = Registration {
            name: name.clone(),
            target: Target::ListenAddress,
            only_namespace: Some(env.ns.clone()),
            exclude_namespace: Some(CONTROLLER_NAMESPACE.into()),
            timeout_seconds: 5,
            delete_on_shutdown: true,
            exempt_username: None,
        };
        let rules = RuleSettings {
            max_replicas,
            policy_exists: sandbox_controller::webhook::known_policies(
                policies.iter().map(|p| p.to_string()),
            ),
            controller_username: None,
        };
        let tls = TlsSettings {
            cert_dir: certs.path().to_path_buf(),
            generate_for: Some(default_sans()),
            reload_interval: Duration::from_secs(5),
        };
        let kubeconfig = env.kubeconfig.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<String>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let client = client_for(&kubeconfig).await;
                let config = WebhookConfig {
                    listen: "127.0.0.1:0".parse().expect("address"),
                    tls,
                    rules,
                    limits: Limits::default(),
                    registration: Some((client, registration)),
                };
                let webhook = Webhook::bind(config).await.expect("binding the webhook");
                let _ = bound_tx.send(webhook.url());
                webhook
                    .run(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("webhook run");
            });
        });
        let url =
            tokio::task::spawn_blocking(move || bound_rx.recv_timeout(Duration::from_secs(30)))
                .await
                .expect("join")
                .expect("the webhook binds");
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        let webhook = Self {
            stop: Some(stop),
            thread: Some(thread),
            _certs: certs,
        };
        wait_until_effective(env, max_replicas).await;
        webhook
    }

    /// Stops the server; it deletes its configuration on the way out.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ScopedWebhook {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn client_for(kubeconfig: &Path) -> kube::Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("client config");
    kube::Client::try_from(config).expect("client")
}

/// The apiserver picks up a new configuration a moment after it is written: probe with an object
/// only the webhook rejects until it is rejected.
async fn wait_until_effective(env: &TestEnv, max_replicas: i32) {
    let probe = pooled_batch(
        "webhook-probe",
        &format!("replicas: {}", i64::from(max_replicas) + 1),
    );
    env.wait_for(
        "the webhook to be called by the apiserver",
        Duration::from_secs(30),
        || {
            let out = env.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &probe);
            let err = stderr(&out);
            std::future::ready(if err.contains(DENIED) {
                Ok(())
            } else {
                Err(err)
            })
        },
    )
    .await;
}

fn pooled_batch(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: {name}\nspec:\n  poolRef: fast-pool\n{}",
        indent(spec)
    )
}

fn templated_batch(name: &str, spec: &str, containers: &str) -> String {
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: {name}\nspec:\n  template:\n    spec:\n      containers:\n{}{}",
        indent_by(containers, 6),
        indent(spec)
    )
}

fn pool(name: &str, capacity: &str, containers: &str) -> String {
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: Pool\nmetadata:\n  name: {name}\nspec:\n  template:\n    spec:\n      containers:\n{}  capacitySpec:\n{}",
        indent_by(containers, 6),
        indent_by(capacity, 4)
    )
}

fn indent(text: &str) -> String {
    indent_by(text, 2)
}

fn indent_by(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{pad}{l}\n"))
        .collect()
}

/// `kubectl apply -f -` (client-side, as the spec types it) into the test namespace.
fn apply(env: &TestEnv, yaml: &str) -> Output {
    env.kubectl_stdin(&["apply", "-f", "-"], &in_namespace(yaml, &env.ns))
}

fn exists(env: &TestEnv, kind: &str, name: &str) -> bool {
    let out = env.kubectl(&["get", kind, name, "-o", "name"]);
    if out.status.success() {
        return true;
    }
    let err = stderr(&out);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "kubectl get {kind} {name} failed oddly: {err}"
    );
    false
}

fn manifest_name(yaml: &str) -> (String, String) {
    let value: Value = serde_yaml_ng::from_str(yaml).expect("manifest YAML");
    let kind = value["kind"].as_str().expect("kind").to_lowercase();
    let name = value["metadata"]["name"].as_str().expect("name").to_owned();
    (kind, name)
}

/// Applies `yaml`, expects it refused with every `expected` fragment in kubectl's stderr, and
/// checks the object was never stored.
fn assert_rejected(env: &TestEnv, what: &str, yaml: &str, expected: &[&str]) -> String {
    let out = apply(env, yaml);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "{what}: kubectl apply succeeded but should have been rejected:\n{yaml}"
    );
    for fragment in expected {
        assert!(
            err.contains(fragment),
            "{what}: kubectl's stderr lacks {fragment:?}:\n{err}"
        );
    }
    let (kind, name) = manifest_name(yaml);
    assert!(
        !exists(env, &kind, &name),
        "{what}: {kind}/{name} was stored despite the rejection"
    );
    err
}

#[tokio::test]
async fn every_spec_manifest_is_accepted_and_passed_dates_are_refused_on_create() {
    let env = harness::env("webhook_spec_manifests").await;
    let _webhook = ScopedWebhook::start(&env, 1000, &[]).await;

    // As written, the spec's expiring batch asks for a time that has passed.
    let err = assert_rejected(
        &env,
        "expiring-batch.yaml as written",
        &spec_manifest("expiring-batch"),
        &[
            DENIED,
            "spec.expireTime: \"2026-03-02T12:00:00Z\" must be in the future when the object is created",
        ],
    );
    assert!(
        err.contains("it is now 20"),
        "the message says what time it is: {err}"
    );

    let names = spec_manifest_names();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let yaml = with_future_expire(&spec_manifest(&name));
        let out = apply(&env, &yaml);
        assert!(
            out.status.success(),
            "{name} was refused:\n{}",
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("Warning:"),
            "{name} drew warnings: {}",
            stderr(&out)
        );
        let (kind, object) = manifest_name(&yaml);
        assert!(
            exists(&env, &kind, &object),
            "{name}: {kind}/{object} not stored"
        );
    }
}

#[tokio::test]
async fn invalid_variants_are_refused_naming_the_field_and_never_stored() {
    let env = harness::env("webhook_invalid_variants").await;
    let _webhook = ScopedWebhook::start(&env, 1000, &["demand-aware"]).await;
    let nginx = "- name: main\n  image: nginx:latest";

    // Rules only the webhook enforces: its message comes through kubectl verbatim.
    let webhook_cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("replicas above the maximum", pooled_batch("too-many", "replicas: 1001"), vec!["spec.replicas: 1001 must be <= 1000"]),
        (
            "container without an image",
            templated_batch("no-image", "replicas: 1", "- name: main"),
            vec!["spec.template.spec.containers[0].image: <unset> must be set"],
        ),
        (
            "empty task command",
            pooled_batch("empty-command", "replicas: 2\ntaskTemplate:\n  spec:\n    process:\n      command: []"),
            vec!["spec.taskTemplate.spec.process.command: [] must be a non-empty command", "for shards 0-1"],
        ),
        (
            "a shard patch that leaves its shard without a command",
            pooled_batch(
                "patch-no-command",
                "replicas: 3\nshardTaskPatches:\n- spec:\n    process:\n      command: [pytest]\n- spec:\n    process:\n      env:\n      - name: SUITE\n        value: slow",
            ),
            vec!["spec.shardTaskPatches[1].spec.process.command: <unset> must be a non-empty command", "for shard 1"],
        ),
        (
            "duplicate env name",
            pooled_batch("dup-env", "taskTemplate:\n  spec:\n    process:\n      command: [run]\n      env:\n      - name: A\n      - name: A"),
            vec!["spec.taskTemplate.spec.process.env[1].name: \"A\" must be unique"],
        ),
        (
            "invalid env name",
            pooled_batch("bad-env", "taskTemplate:\n  spec:\n    process:\n      command: [run]\n      env:\n      - name: 1X"),
            vec!["spec.taskTemplate.spec.process.env[0].name: \"1X\" must consist of letters"],
        ),
        (
            "zero timeout",
            pooled_batch("zero-timeout", "taskTemplate:\n  spec:\n    timeoutSeconds: 0\n    process:\n      command: [run]"),
            vec!["spec.taskTemplate.spec.timeoutSeconds: 0 must be > 0"],
        ),
        (
            "more task patches than replicas",
            pooled_batch(
                "extra-patches",
                "replicas: 1\nshardTaskPatches:\n- spec:\n    process:\n      command: [a]\n- spec:\n    process:\n      command: [b]",
            ),
            vec!["spec.shardTaskPatches: [2 entries] has 2 entries, more than spec.replicas (1)"],
        ),
        (
            "poolRef that is no object name",
            "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: bad-pool-ref\nspec:\n  poolRef: Fast_Pool\n".to_string(),
            vec!["spec.poolRef: \"Fast_Pool\" must be a valid object name"],
        ),
        (
            "a shard patch that breaks the pod",
            templated_batch("broken-shard", "replicas: 2\nshardPatches:\n- spec:\n    containers:\n    - name: sidecar", nginx),
            vec!["spec.shardPatches[0]:", "leaves the pod of shard 0 invalid", "containers[1].image"],
        ),
        (
            "a policy that cannot be loaded",
            pooled_batch("unknown-policy", "replicas: 1").replace(
                "metadata:\n",
                "metadata:\n  annotations:\n    policy.sandbox.opensandbox.io/shard-tasks: no-such-policy\n",
            ),
            vec!["metadata.annotations[policy.sandbox.opensandbox.io/shard-tasks]: \"no-such-policy\" names no loadable policy"],
        ),
        (
            "expireTime in the past",
            pooled_batch("expired", "expireTime: \"2020-01-01T00:00:00Z\""),
            vec!["spec.expireTime: \"2020-01-01T00:00:00Z\" must be in the future"],
        ),
        (
            "pool container without an image",
            pool("imageless-pool", "bufferMax: 2\nbufferMin: 1\npoolMax: 5\npoolMin: 0", "- name: sandbox"),
            vec!["spec.template.spec.containers[0].image: <unset> must be set"],
        ),
        (
            "alloc-release naming pods the batch does not hold",
            pooled_batch("foreign-release", "replicas: 1").replace(
                "metadata:\n",
                "metadata:\n  annotations:\n    sandbox.opensandbox.io/alloc-release: '{\"pods\":[\"someone-elses-pod\"]}'\n",
            ),
            vec![
                "metadata.annotations[sandbox.opensandbox.io/alloc-release]:",
                "lists pod(s) \"someone-elses-pod\" that this BatchSandbox does not hold",
            ],
        ),
        (
            "pool name too long for a label",
            pool(&"p".repeat(64), "bufferMax: 2\nbufferMin: 1\npoolMax: 5\npoolMin: 0", "- name: sandbox\n  image: busybox"),
            vec!["metadata.name:", "must be at most 63 characters"],
        ),
    ];
    for (what, yaml, expected) in &webhook_cases {
        let mut expected = expected.clone();
        expected.push(DENIED);
        assert_rejected(&env, what, yaml, &expected);
    }

    // Every failing field at once, in one denial.
    let err = assert_rejected(
        &env,
        "several problems",
        &pooled_batch(
            "many-problems",
            "replicas: 2000\nexpireTime: \"2020-01-01T00:00:00Z\"\ntaskTemplate:\n  spec:\n    timeoutSeconds: -1\n    process:\n      command: [\"\"]\n      env:\n      - name: \"bad name\"",
        ),
        &[
            DENIED,
            "spec.replicas: 2000 must be <= 1000",
            "spec.taskTemplate.spec.timeoutSeconds: -1 must be > 0",
            "spec.taskTemplate.spec.process.env[0].name: \"bad name\"",
            "spec.taskTemplate.spec.process.command: [\"\"]",
            "spec.expireTime: \"2020-01-01T00:00:00Z\"",
        ],
    );
    assert_eq!(
        err.matches("; spec.").count(),
        4,
        "five errors joined in one message: {err}"
    );

    // Rules the CRD schema already enforces (CEL and OpenAPI) are refused before the webhook is
    // asked; the apiserver's own message names the field.
    let schema_cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "negative replicas",
            pooled_batch("negative", "replicas: -1"),
            vec!["spec.replicas", "greater than or equal to 0"],
        ),
        (
            "both template and poolRef",
            templated_batch("both-modes", "poolRef: fast-pool", nginx),
            vec!["spec.template cannot be set together with a named spec.poolRef"],
        ),
        (
            "pooled batch with shardPatches",
            pooled_batch(
                "pooled-patches",
                "shardPatches:\n- metadata:\n    labels:\n      x: y",
            ),
            vec!["spec.shardPatches applies to non-pooled batches only"],
        ),
        (
            "bufferMin above bufferMax",
            pool(
                "inverted-buffer",
                "bufferMax: 20\nbufferMin: 30\npoolMax: 50\npoolMin: 10",
                "- name: sandbox\n  image: busybox",
            ),
            vec!["spec.capacitySpec", "bufferMin must be <= bufferMax"],
        ),
        (
            "pause: true",
            pooled_batch("paused", "pause: true"),
            vec!["spec.pause", "pause/resume is not supported by this controller (it takes no image snapshots)"],
        ),
        (
            "maxUnavailable out of range, on both strategies at once",
            pool(
                "bad-pacing",
                "bufferMax: 2\nbufferMin: 1\npoolMax: 5\npoolMin: 0",
                "- name: sandbox\n  image: busybox",
            )
            .replace(
                "  capacitySpec:\n",
                "  scaleStrategy:\n    maxUnavailable: 150%\n  updateStrategy:\n    maxUnavailable: -1\n  capacitySpec:\n",
            ),
            vec![
                "spec.scaleStrategy.maxUnavailable",
                "spec.updateStrategy.maxUnavailable",
                "maxUnavailable must be a non-negative integer or a percentage from 0% to 100%",
            ],
        ),
    ];
    for (what, yaml, expected) in &schema_cases {
        assert_rejected(&env, what, yaml, expected);
    }

    // The same objects, fixed, go through.
    let fixed = pooled_batch(
        "fixed",
        "replicas: 3\ntaskTemplate:\n  spec:\n    timeoutSeconds: 60\n    process:\n      command: [run]\n      env:\n      - name: A",
    );
    let out = apply(&env, &fixed);
    assert!(out.status.success(), "{}", stderr(&out));
    let allowed_policy = pooled_batch("known-policy", "replicas: 1").replace(
        "metadata:\n",
        "metadata:\n  annotations:\n    policy.sandbox.opensandbox.io/shard-tasks: demand-aware\n",
    );
    let out = apply(&env, &allowed_policy);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn updates_keep_pool_ref_and_scale_within_bounds() {
    let env = harness::env("webhook_updates").await;
    let _webhook = ScopedWebhook::start(&env, 1000, &[]).await;

    let original = pooled_batch(
        "claim",
        "replicas: 3\nshardTaskPatches:\n- spec:\n    process:\n      command: [a]\n- spec:\n    process:\n      command: [b]\n- spec:\n    process:\n      command: [c]",
    );
    let out = apply(&env, &original);
    assert!(out.status.success(), "{}", stderr(&out));
    let pool_ref = || {
        env.kubectl_ok(&[
            "get",
            "batchsandbox",
            "claim",
            "-o",
            "jsonpath={.spec.poolRef}",
        ])
    };

    // Another pool: the CRD's transition rule or the webhook refuses it; either names the field.
    let out = apply(
        &env,
        &original.replace("poolRef: fast-pool", "poolRef: other-pool"),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("spec.poolRef"), "{}", stderr(&out));

    // Dropping poolRef for a template: no CEL rule sees a removed field, the webhook does.
    let switched = templated_batch(
        "claim",
        "replicas: 3",
        "- name: main\n  image: nginx:latest",
    );
    let out = apply(&env, &switched);
    assert!(
        !out.status.success(),
        "switching a live batch to a template was allowed"
    );
    let err = stderr(&out);
    assert!(
        err.contains(DENIED)
            && err.contains("spec.poolRef: <unset> cannot change once set (was \"fast-pool\")"),
        "{err}"
    );
    assert_eq!(pool_ref(), "fast-pool");

    // Scaling below the patch count is allowed with a warning kubectl prints.
    let out = env.kubectl(&[
        "patch",
        "batchsandbox",
        "claim",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("Warning: spec.shardTaskPatches has 3 entries but spec.replicas is 1"),
        "{}",
        stderr(&out)
    );

    // alloc-release may name only the batch's own pods (it holds none yet).
    let out = env.kubectl(&[
        "annotate",
        "batchsandbox",
        "claim",
        r#"sandbox.opensandbox.io/alloc-release={"pods":["not-mine"]}"#,
    ]);
    assert!(!out.status.success(), "a foreign alloc-release was allowed");
    assert!(
        stderr(&out).contains(DENIED)
            && stderr(&out)
                .contains("lists pod(s) \"not-mine\" that this BatchSandbox does not hold"),
        "{}",
        stderr(&out)
    );

    // The scale subresource goes through the webhook too.
    let out = env.kubectl(&["scale", "batchsandbox", "claim", "--replicas=5000"]);
    assert!(
        !out.status.success(),
        "kubectl scale past the maximum was allowed"
    );
    assert!(
        stderr(&out).contains("spec.replicas: 5000 must be <= 1000"),
        "{}",
        stderr(&out)
    );
    let out = env.kubectl(&["scale", "batchsandbox", "claim", "--replicas=3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        env.kubectl_ok(&[
            "get",
            "batchsandbox",
            "claim",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "3"
    );
}

#[tokio::test]
async fn the_standalone_webhook_registers_for_its_namespace_and_unregisters_on_sigterm() {
    let env = harness::env("webhook_standalone").await;
    let other = harness::env("webhook_standalone_other").await;
    let certs = tempfile::tempdir().expect("cert dir");
    let mut child = StandaloneWebhook::spawn(
        &env,
        &[
            "webhook",
            "--webhook-namespace",
            &env.ns,
            "--max-replicas",
            "10",
        ],
        certs.path(),
    );
    let url = child.url.clone();
    wait_until_effective(&env, 10).await;

    let name = Registration::scoped_name(registration::DEFAULT_CONFIGURATION_NAME, &env.ns);
    let configs: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    let config = serde_json::to_value(configs.get(&name).await.expect("registered configuration"))
        .expect("json");
    let webhook = &config["webhooks"][0];
    assert_eq!(webhook["clientConfig"]["url"], url.as_str());
    assert!(
        webhook["clientConfig"]["caBundle"]
            .as_str()
            .is_some_and(|ca| !ca.is_empty())
    );
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["timeoutSeconds"], 5);
    let selector = webhook["namespaceSelector"]["matchExpressions"].to_string();
    assert!(
        selector.contains(&format!("\"In\",\"values\":[\"{}\"]", env.ns)),
        "{selector}"
    );
    assert!(
        selector.contains(&format!(
            "\"NotIn\",\"values\":[\"{CONTROLLER_NAMESPACE}\"]"
        )),
        "{selector}"
    );

    // --max-replicas 10 applies here, and only here.
    let eleven = pooled_batch("eleven", "replicas: 11");
    assert_rejected(
        &env,
        "eleven replicas",
        &eleven,
        &[DENIED, "spec.replicas: 11 must be <= 10"],
    );
    let out = apply(&other, &eleven);
    assert!(
        out.status.success(),
        "a namespace outside the scope was validated: {}",
        stderr(&out)
    );

    let status = child.terminate();
    assert!(status.success(), "the webhook exited with {status}");
    let gone = configs.get_opt(&name).await.expect("get configuration");
    assert!(gone.is_none(), "the configuration outlived the webhook");
    let out = apply(&env, &eleven);
    assert!(
        out.status.success(),
        "still validated after the webhook stopped: {}",
        stderr(&out)
    );
}

/// `sandbox-controller run --webhook`: the controller reconciles while the webhook, in the same
/// process and scoped by `--namespace`, guards what reaches it.
#[tokio::test]
async fn run_with_webhook_serves_admission_next_to_the_controller() {
    let env = harness::env("webhook_in_run").await;
    let certs = tempfile::tempdir().expect("cert dir");
    let mut process = StandaloneWebhook::spawn(
        &env,
        &[
            "run",
            "--webhook",
            "--namespace",
            &env.ns,
            "--health-addr",
            "127.0.0.1:0",
        ],
        certs.path(),
    );
    wait_until_effective(&env, 1000).await;
    let name = Registration::scoped_name(registration::DEFAULT_CONFIGURATION_NAME, &env.ns);
    let configs: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    assert!(
        configs.get_opt(&name).await.expect("get").is_some(),
        "run --namespace scopes the webhook's registration"
    );

    for manifest in ["pool", "heterogeneous-tasks"] {
        let out = apply(&env, &spec_manifest(manifest));
        assert!(out.status.success(), "{manifest}: {}", stderr(&out));
    }
    env.wait_for(
        "the controller to warm the pool",
        Duration::from_secs(60),
        || {
            let total =
                env.kubectl(&["get", "pool", "fast-pool", "-o", "jsonpath={.status.total}"]);
            let total = String::from_utf8_lossy(&total.stdout)
                .trim()
                .parse::<i64>()
                .unwrap_or(0);
            std::future::ready(total > 0)
        },
    )
    .await;
    let fewer_shards = spec_manifest("heterogeneous-tasks")
        .replace("name: task-batch", "name: task-batch-two")
        .replace("replicas: 3", "replicas: 2");
    assert_rejected(
        &env,
        "three patches for two shards",
        &fewer_shards,
        &[DENIED, "spec.shardTaskPatches: [3 entries]"],
    );

    let status = process.terminate();
    assert!(status.success(), "run exited with {status}");
    assert!(
        configs.get_opt(&name).await.expect("get").is_none(),
        "the configuration outlived run"
    );
}

/// `sandbox-controller webhook` as a child process.
struct StandaloneWebhook {
    child: Option<Child>,
    url: String,
    /// Kept open: a closed pipe would fail the child's next write to stdout.
    _stdout: BufReader<ChildStdout>,
}

impl StandaloneWebhook {
    /// `sandbox-controller <args> --webhook-listen 127.0.0.1:0 --webhook-cert-dir <dir>`, which
    /// prints where it listens as its first line.
    fn spawn(env: &TestEnv, args: &[&str], cert_dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandbox-controller"))
            .args(args)
            .args(["--webhook-listen", "127.0.0.1:0"])
            .arg("--webhook-cert-dir")
            .arg(cert_dir)
            .args(["--controller-namespace", CONTROLLER_NAMESPACE])
            .env("KUBECONFIG", &env.kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning sandbox-controller");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("reading the webhook's first line");
        let url = line
            .trim()
            .strip_prefix("webhook listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self {
            child: Some(child),
            url,
            _stdout: stdout,
        }
    }

    /// SIGTERM, then wait (at most 20 s) for a clean exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the webhook did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StandaloneWebhook {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The in-cluster install, `deploy/kubernetes`: each overlay, as kubectl's kustomize renders it,
/// passes `kubectl apply -k --server-side --dry-run=server` (moved into the test namespace by a
/// kustomization around it), and so does the sandbox namespaces' NetworkPolicy. This cluster has
/// no cert-manager, so its kinds (Issuer, Certificate) are left out of the dry run and checked
/// here instead: the Certificate the CA injector reads is the one that writes the Secret the
/// controller mounts, for the Service's DNS name, from an Issuer that exists.
#[tokio::test]
async fn deploy_manifests_are_accepted_by_the_apiserver() {
    const CERT_MANAGER_GROUP: &str = "cert-manager.io/";
    let env = harness::env("webhook_deploy_manifests").await;
    let root: PathBuf = harness::repo_root().join("deploy/kubernetes");

    let render = |dir: &Path| -> Vec<Value> {
        let out = env.kubectl(&["kustomize", dir.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "kubectl kustomize {} failed:\n{}",
            dir.display(),
            stderr(&out)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8");
        serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML"))
            .filter(|v: &Value| !v.is_null())
            .collect()
    };
    let find = |docs: &[Value], kind: &str| -> Vec<Value> {
        docs.iter().filter(|d| d["kind"] == kind).cloned().collect()
    };
    let one = |docs: &[Value], kind: &str| -> Value {
        let found = find(docs, kind);
        assert_eq!(found.len(), 1, "expected one {kind}, got {found:?}");
        found[0].clone()
    };
    // `kubectl apply -k` of `dir` (plus kustomize `components`) inside a kustomization that moves
    // it into the test namespace and drops the kinds this cluster cannot validate.
    let dry_run = |dir: &Path, components: &[PathBuf], drop: &[Value]| {
        let wrapper = tempfile::tempdir().expect("temp dir");
        // kustomize takes no absolute paths in `resources`.
        let from = wrapper.path().canonicalize().expect("temp dir");
        let relative = |to: &Path| -> String {
            let to = to.canonicalize().expect("kustomization dir");
            let path: PathBuf = from
                .components()
                .skip(1)
                .map(|_| "..")
                .collect::<PathBuf>()
                .join(to.strip_prefix("/").expect("absolute"));
            path.to_str().expect("utf-8 path").to_owned()
        };
        let mut kustomization = serde_json::json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": env.ns,
            "resources": [relative(dir)],
            "components": components.iter().map(|c| relative(c)).collect::<Vec<_>>(),
            "patches": [],
        });
        for doc in drop {
            let patch = serde_json::json!({
                "$patch": "delete",
                "apiVersion": doc["apiVersion"],
                "kind": doc["kind"],
                "metadata": {"name": doc["metadata"]["name"], "namespace": doc["metadata"]["namespace"]},
            });
            kustomization["patches"]
                .as_array_mut()
                .expect("patches")
                .push(
                    serde_json::json!({"patch": serde_yaml_ng::to_string(&patch).expect("YAML")}),
                );
        }
        std::fs::write(
            wrapper.path().join("kustomization.yaml"),
            serde_yaml_ng::to_string(&kustomization).expect("YAML"),
        )
        .expect("writing the kustomization");
        let out = env.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=sbx-e2e-deploy",
            "--dry-run=server",
            "-k",
            wrapper.path().to_str().expect("utf-8 path"),
        ]);
        assert!(
            out.status.success(),
            "kubectl apply -k {} --dry-run=server was refused:\n{}",
            dir.display(),
            stderr(&out)
        );
        let applied = String::from_utf8_lossy(&out.stdout).into_owned();
        let rendered = render(wrapper.path());
        assert_eq!(
            applied
                .lines()
                .filter(|l| l.contains("(server dry run)"))
                .count(),
            rendered.len(),
            "not every object of {} was applied:\n{applied}",
            dir.display()
        );
        rendered
    };
    let arg_value = |args: &[Value], flag: &str| -> Option<String> {
        let prefix = format!("{flag}=");
        args.iter()
            .filter_map(Value::as_str)
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
    };
    let env_value = |container: &Value, name: &str| -> Value {
        container["env"]
            .as_array()
            .and_then(|vars| vars.iter().find(|v| v["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no env {name} in {container}"))
    };

    for (overlay, cert_manager) in [
        ("overlays/cert-manager", true),
        ("overlays/self-managed-ca", false),
    ] {
        let dir = root.join(overlay);
        let docs = render(&dir);
        let ns = "opensandbox-system";

        // The controller: two leader-elected replicas that all serve the webhook.
        let deployment = one(&docs, "Deployment");
        assert_eq!(deployment["metadata"]["namespace"], ns);
        assert_eq!(deployment["spec"]["replicas"], 2, "{overlay}");
        let pod = &deployment["spec"]["template"];
        let pod_labels = &pod["metadata"]["labels"];
        let container = &pod["spec"]["containers"][0];
        let args = container["args"].as_array().expect("args").clone();
        assert_eq!(args[0], "run");
        for flag in ["--leader-elect", "--webhook"] {
            assert!(
                args.iter().any(|a| a == flag),
                "{overlay}: no {flag} in {args:?}"
            );
        }
        assert_eq!(
            arg_value(&args, "--leader-election-namespace").as_deref(),
            Some("$(POD_NAMESPACE)")
        );
        assert_eq!(
            env_value(container, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        assert_eq!(
            arg_value(&args, "--health-addr").as_deref(),
            Some("0.0.0.0:8081")
        );
        assert_eq!(
            arg_value(&args, "--webhook-listen").as_deref(),
            Some("0.0.0.0:9443")
        );
        let port = |name: &str| -> i64 {
            container["ports"]
                .as_array()
                .and_then(|ports| ports.iter().find(|p| p["name"] == name))
                .and_then(|p| p["containerPort"].as_i64())
                .unwrap_or_else(|| panic!("no port {name}"))
        };
        assert_eq!(port("health"), 8081);
        assert_eq!(port("webhook"), 9443);
        let readiness = &container["readinessProbe"]["httpGet"];
        assert_eq!(
            (&readiness["path"], &readiness["port"], &readiness["scheme"]),
            (
                &Value::from("/readyz"),
                &Value::from("webhook"),
                &Value::from("HTTPS")
            ),
            "readiness must be the webhook's, which followers pass too"
        );
        let liveness = &container["livenessProbe"]["httpGet"];
        assert_eq!(
            (&liveness["path"], &liveness["port"]),
            (&Value::from("/healthz"), &Value::from("health"))
        );
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"]["requests"][resource].is_string(),
                "{overlay}"
            );
            assert!(
                container["resources"]["limits"][resource].is_string(),
                "{overlay}"
            );
        }
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["spec"]["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let cert_volume = pod["spec"]["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == "webhook-certs"))
            .expect("webhook-certs volume");
        let tls_secret = cert_volume["secret"]["secretName"].clone();

        // The webhook Service and the PodDisruptionBudget select the controller's pods.
        let service = one(&docs, "Service");
        assert_eq!(&service["spec"]["selector"], pod_labels);
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "webhook");
        let pdb = one(&docs, "PodDisruptionBudget");
        assert_eq!(&pdb["spec"]["selector"]["matchLabels"], pod_labels);
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        let service_host = format!(
            "{}.{}.svc",
            service["metadata"]["name"].as_str().expect("name"),
            service["metadata"]["namespace"]
                .as_str()
                .expect("namespace")
        );

        let registration = env_value(container, "WEBHOOK_REGISTRATION")["value"].clone();
        let cert_manager_docs: Vec<Value> = docs
            .iter()
            .filter(|d| {
                d["apiVersion"]
                    .as_str()
                    .is_some_and(|v| v.starts_with(CERT_MANAGER_GROUP))
            })
            .cloned()
            .collect();
        if cert_manager {
            assert_eq!(registration, "none");
            let config = one(&docs, "ValidatingWebhookConfiguration");
            check_webhook_configuration(&config);
            let client = &config["webhooks"][0]["clientConfig"]["service"];
            assert_eq!(client["name"], service["metadata"]["name"]);
            assert_eq!(client["namespace"], service["metadata"]["namespace"]);
            let certificate = one(&docs, "Certificate");
            let issuer = one(&docs, "Issuer");
            assert_eq!(cert_manager_docs.len(), 2, "{cert_manager_docs:?}");
            assert_eq!(
                config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
                format!(
                    "{}/{}",
                    certificate["metadata"]["namespace"]
                        .as_str()
                        .expect("namespace"),
                    certificate["metadata"]["name"].as_str().expect("name")
                )
            );
            assert_eq!(certificate["metadata"]["namespace"], ns);
            assert_eq!(certificate["spec"]["secretName"], tls_secret);
            assert!(
                certificate["spec"]["dnsNames"]
                    .as_array()
                    .is_some_and(|names| names.iter().any(|n| n == service_host.as_str())),
                "the Certificate does not name {service_host}: {certificate}"
            );
            assert_eq!(certificate["spec"]["issuerRef"]["kind"], "Issuer");
            assert_eq!(
                certificate["spec"]["issuerRef"]["name"],
                issuer["metadata"]["name"]
            );
            assert_eq!(issuer["metadata"]["namespace"], ns);
        } else {
            assert_eq!(registration, "service");
            assert!(cert_manager_docs.is_empty(), "{cert_manager_docs:?}");
            assert!(find(&docs, "ValidatingWebhookConfiguration").is_empty());
            assert_eq!(
                arg_value(&args, "--webhook-service").as_deref(),
                Some("$(POD_NAMESPACE)/sandbox-controller-webhook:443")
            );
            let grants_registration = find(&docs, "ClusterRole").iter().any(|role| {
                role["rules"].as_array().into_iter().flatten().any(|rule| {
                    rule["resources"] == serde_json::json!(["validatingwebhookconfigurations"])
                        && rule["resourceNames"]
                            == serde_json::json!([registration::DEFAULT_CONFIGURATION_NAME])
                        && rule["verbs"] == serde_json::json!(["create", "patch"])
                })
            });
            assert!(
                grants_registration,
                "{overlay}: no RBAC for the registration"
            );
        }
        for kind in [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ] {
            assert!(!find(&docs, kind).is_empty(), "{overlay} has no {kind}");
        }

        let applied = dry_run(&dir, &[], &cert_manager_docs);
        assert_eq!(applied.len() + cert_manager_docs.len(), docs.len());
    }

    // Every overlay's controller signs executor requests with a key from a Secret of its own
    // namespace, which it may read and create (and nothing else among Secrets).
    for overlay in ["cert-manager", "self-managed-ca"] {
        let docs = render(&root.join("overlays").join(overlay));
        let container = &one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
        let secret = env_value(container, "EXECUTOR_SIGNING_KEY_SECRET")["value"].clone();
        assert_eq!(secret, "sandbox-executor-signing-key", "{overlay}");
        let role = find(&docs, "Role")
            .into_iter()
            .find(|r| r["metadata"]["name"] == "sandbox-controller")
            .expect("the controller's Role");
        let secret_rules: Vec<&Value> = role["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["resources"] == serde_json::json!(["secrets"]))
            .collect();
        assert!(
            secret_rules
                .iter()
                .any(|r| r["verbs"] == serde_json::json!(["get"])
                    && r["resourceNames"] == serde_json::json!([secret.clone()])),
            "{overlay}: {secret_rules:?}"
        );
        assert!(
            secret_rules
                .iter()
                .all(|r| r["verbs"] == serde_json::json!(["get"])
                    || r["verbs"] == serde_json::json!(["create"])),
            "{overlay}: no other rights on Secrets: {secret_rules:?}"
        );
        assert!(
            find(&docs, "ClusterRole")
                .iter()
                .all(|r| !r["rules"].to_string().contains("\"secrets\"")),
            "{overlay}: no cluster-wide rights on Secrets"
        );
    }

    // The sandbox namespaces' NetworkPolicy, applied as documented (`-n <namespace>`).
    let sandbox_ns = root.join("sandbox-namespace");
    let out = env.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=sbx-e2e-deploy",
        "--dry-run=server",
        "-k",
        sandbox_ns.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "kubectl apply -k {} -n {} --dry-run=server was refused:\n{}",
        sandbox_ns.display(),
        env.ns,
        stderr(&out)
    );
    let policy = one(&render(&sandbox_ns), "NetworkPolicy");
    let controller_labels = &one(
        &render(&root.join("overlays/self-managed-ca")),
        "Deployment",
    )["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/managed-by"],
        "sandbox-controller"
    );
    let executor_rule = policy["spec"]["ingress"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["ports"][0]["port"] == 5758))
        .expect("a rule for the executor port");
    assert_eq!(executor_rule["from"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        &executor_rule["from"][0]["podSelector"]["matchLabels"],
        controller_labels
    );
    assert_eq!(
        executor_rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "opensandbox-system"
    );
    let command_rule = policy["spec"]["ingress"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["ports"][0]["port"] == 44772))
        .expect("a rule for the command API's port");
    assert_eq!(command_rule["from"].as_array().map(Vec::len), Some(1));
    for selector in ["namespaceSelector", "podSelector"] {
        assert_eq!(
            command_rule["from"][0][selector]["matchLabels"]["sandbox.opensandbox.io/client"],
            "true",
            "{selector}"
        );
    }
    assert_eq!(
        policy["spec"]["ingress"].as_array().map(Vec::len),
        Some(2),
        "no other port is open"
    );
}

fn check_webhook_configuration(config: &Value) {
    let annotation = &config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"];
    assert!(
        annotation.as_str().is_some_and(|a| a.contains('/')),
        "inject-ca-from is missing: {config}"
    );
    for webhook in config["webhooks"].as_array().expect("webhooks") {
        assert_eq!(webhook["failurePolicy"], "Fail");
        assert_eq!(webhook["sideEffects"], "None");
        assert!(
            webhook["timeoutSeconds"]
                .as_i64()
                .is_some_and(|t| (1..=5).contains(&t)),
            "{webhook}"
        );
        let selector = webhook["namespaceSelector"].to_string();
        assert!(
            selector.contains("NotIn") && selector.contains(CONTROLLER_NAMESPACE),
            "the controller's namespace is not excluded: {selector}"
        );
        assert_eq!(
            webhook["clientConfig"]["service"]["path"],
            registration::VALIDATE_PATH
        );
    }
}
