//! What `deploy/kubernetes` promises an operator, proven against the local control plane with the
//! real `sandbox-controller run` under the identity the install gives it: the ServiceAccount of
//! the rendered manifests, bound to their ClusterRoles and Role, authenticated with a token the
//! apiserver issued for it (TokenRequest), not the admin credentials the other tests use.
//!
//! * every path the controller takes (pooled and template batches, tasks, scale, expiry, deletion,
//!   events, webhook registration, leader election, policy ConfigMaps) needs no right beyond those
//!   manifests: the controller's log has no `forbidden` and the work converges;
//! * a new binary takes over from the old one mid-run (the rolling update's order: the new
//!   replica starts as follower, the old one is stopped, the new one takes the Lease) and nothing
//!   is lost, restarted, leaked or held twice;
//! * the uninstall order of docs/deploy.md leaves no object, pod, finalizer or Terminating object.
//!
//! The controller runs with `--namespace` (tests share the cluster), so it lists and watches at
//! namespace scope; that the same verbs hold at cluster scope, as an unscoped controller uses
//! them, is asked of the apiserver (`kubectl auth can-i --all-namespaces` as the ServiceAccount).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use sandbox_controller::webhook::registration::{self, Registration};
use serde_json::Value;

use crate::controller::{ControllerProcess, ledger};
use crate::fixtures;
use crate::harness::{self, TestEnv};

const T: Duration = Duration::from_secs(90);
const MANAGED_PODS: &str = "app.kubernetes.io/managed-by=sandbox-controller";

/// The install's RBAC, applied for one test: the controller's namespace (a second test namespace
/// standing in for `opensandbox-system`), the ServiceAccount's kubeconfig, and the cluster-scoped
/// objects to delete afterwards.
struct DeployedIdentity {
    system: TestEnv,
    service_account: String,
    kubeconfig: PathBuf,
    cluster_scoped: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Drop for DeployedIdentity {
    fn drop(&mut self) {
        for (kind, name) in &self.cluster_scoped {
            let _ =
                self.system
                    .kubectl(&["delete", kind, name, "--ignore-not-found", "--wait=false"]);
        }
    }
}

/// `to` relative to `from` (kustomize takes no absolute paths in `resources`).
fn relative(from: &Path, to: &Path) -> String {
    let from = from.canonicalize().expect("canonical path");
    let to = to.canonicalize().expect("canonical path");
    let path: PathBuf = from
        .components()
        .skip(1)
        .map(|_| "..")
        .collect::<PathBuf>()
        .join(to.strip_prefix("/").expect("absolute"));
    path.to_str().expect("utf-8 path").to_owned()
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The RBAC kinds of `deploy/kubernetes/overlays/self-managed-ca` (the base's rights plus the
/// webhook registration), rendered by kubectl's kustomize inside a kustomization that only moves
/// them into `system` and suffixes their names (cluster-scoped names must not collide between
/// tests). The other changes: the bindings' subjects follow the ServiceAccount (see
/// [`deployed_identity`]), and the registration rule's `resourceNames` becomes the configuration
/// name a `--namespace`-scoped controller uses (the base name plus the namespace).
fn render_rbac(env: &TestEnv, system: &TestEnv, dir: &Path) -> Vec<Value> {
    let overlay = harness::repo_root().join("deploy/kubernetes/overlays/self-managed-ca");
    let kustomization = serde_json::json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": system.ns,
        "nameSuffix": format!("-{}", system.ns),
        "resources": [relative(dir, &overlay)],
    });
    std::fs::write(
        dir.join("kustomization.yaml"),
        serde_yaml_ng::to_string(&kustomization).expect("YAML"),
    )
    .expect("writing the kustomization");
    let rendered = env.kubectl_ok(&["kustomize", dir.to_str().expect("utf-8 path")]);
    let scoped_registration =
        Registration::scoped_name(registration::DEFAULT_CONFIGURATION_NAME, &env.ns);
    let mut docs: Vec<Value> = yaml_docs(&rendered)
        .into_iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some(
                    "ServiceAccount"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "Role"
                        | "RoleBinding"
                )
            )
        })
        .collect();
    let mut registration_rules = 0;
    for doc in &mut docs {
        let rules = doc.get_mut("rules").and_then(Value::as_array_mut);
        for rule in rules.into_iter().flatten() {
            if let Some(names) = rule.get_mut("resourceNames").and_then(Value::as_array_mut) {
                for name in names.iter_mut() {
                    if name == registration::DEFAULT_CONFIGURATION_NAME {
                        *name = Value::from(scoped_registration.clone());
                        registration_rules += 1;
                    }
                }
            }
        }
    }
    assert_eq!(
        registration_rules, 1,
        "one rule of the overlay names the webhook configuration"
    );
    docs
}

/// Applies the install's RBAC (see [`render_rbac`]) and returns a kubeconfig that authenticates
/// as its ServiceAccount with a bound token from the TokenRequest API, for the same (loopback)
/// apiserver as the test's own kubeconfig.
async fn deployed_identity(env: &TestEnv) -> DeployedIdentity {
    let system = harness::env(&format!("{}-sys", env.ns)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut docs = render_rbac(env, &system, dir.path());

    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ]),
        "the overlay's RBAC kinds"
    );
    let accounts: Vec<String> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .map(|d| d["metadata"]["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(accounts.len(), 1, "one ServiceAccount: {accounts:?}");
    let service_account = accounts[0].clone();
    // Binding subjects are written out (deploy/kubernetes/README.md, "Another namespace"):
    // every binding names the base's ServiceAccount, which moves with the install.
    for binding in docs
        .iter_mut()
        .filter(|d| d["kind"].as_str().is_some_and(|k| k.ends_with("Binding")))
    {
        assert_eq!(
            binding["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": "sandbox-controller", "namespace": "opensandbox-system"}]),
            "every binding names the install's ServiceAccount"
        );
        binding["subjects"] = serde_json::json!([
            {"kind": "ServiceAccount", "name": service_account, "namespace": system.ns}
        ]);
    }
    let cluster_scoped = docs
        .iter()
        .filter(|d| d["kind"].as_str().is_some_and(|k| k.starts_with("Cluster")))
        .map(|d| {
            (
                d["kind"].as_str().expect("kind").to_lowercase(),
                d["metadata"]["name"].as_str().expect("name").to_owned(),
            )
        })
        .collect();
    let manifest = docs
        .iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n");
    let out = system.kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=sbx-e2e",
            "-f",
            "-",
        ],
        &manifest,
    );
    assert!(
        out.status.success(),
        "applying the install's RBAC:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Clean up even if a later step panics.
    let identity = DeployedIdentity {
        system,
        service_account,
        kubeconfig: dir.path().join("service-account.kubeconfig"),
        cluster_scoped,
        _dir: dir,
    };

    let token = identity.system.kubectl_ok(&[
        "create",
        "token",
        &identity.service_account,
        "--duration=2h",
    ]);
    let mut kubeconfig: Value = serde_yaml_ng::from_str(&env.kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "--flatten",
    ]))
    .expect("kubeconfig YAML");
    let user = &mut kubeconfig["users"][0];
    user["name"] = Value::from(identity.service_account.clone());
    user["user"] = serde_json::json!({"token": token.trim()});
    kubeconfig["contexts"][0]["context"]["user"] = Value::from(identity.service_account.clone());
    std::fs::write(
        &identity.kubeconfig,
        serde_yaml_ng::to_string(&kubeconfig).expect("YAML"),
    )
    .expect("writing the ServiceAccount's kubeconfig");

    // The kubeconfig really is the ServiceAccount, not an administrator.
    let whoami = identity.kubectl_as(
        env,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        format!(
            "system:serviceaccount:{}:{}",
            identity.system.ns, identity.service_account
        ),
        "{}",
        String::from_utf8_lossy(&whoami.stderr)
    );
    let secrets = identity.kubectl_as(env, &["get", "secrets"]);
    assert!(
        !secrets.status.success() && String::from_utf8_lossy(&secrets.stderr).contains("forbidden"),
        "the ServiceAccount must not read Secrets: {secrets:?}"
    );
    identity
}

impl DeployedIdentity {
    /// kubectl in `env`'s namespace as the ServiceAccount.
    fn kubectl_as(&self, env: &TestEnv, args: &[&str]) -> std::process::Output {
        let kubectl = std::env::var_os("SBX_KUBECTL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let dev = harness::dev_dir().join("bin/kubectl");
                if dev.exists() {
                    dev
                } else {
                    PathBuf::from("kubectl")
                }
            });
        Command::new(kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .arg("-n")
            .arg(&env.ns)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running kubectl")
    }

    /// `sandbox-controller run` from `binary`, as the ServiceAccount, configured like
    /// `base/controller.yaml` (leader election and policy ConfigMaps in the controller's
    /// namespace, the webhook on every replica), scoped to `env`'s namespace. The webhook
    /// registers its loopback URL instead of the Service (same verbs: server-side apply of the
    /// configuration) and, like `--webhook-registration=service`, leaves it registered on exit.
    fn start(&self, env: &TestEnv, binary: &Path, cert_dir: &Path) -> ControllerProcess {
        let ns = &self.system.ns;
        env.start_controller_from(
            binary,
            &self.kubeconfig,
            &[
                "--leader-elect",
                &format!("--leader-election-namespace={ns}"),
                &format!("--policy-namespace={ns}"),
                &format!("--controller-namespace={ns}"),
                "--webhook",
                "--webhook-listen=127.0.0.1:0",
                &format!("--webhook-cert-dir={}", cert_dir.display()),
                "--webhook-registration=url",
                "--webhook-keep-registration",
            ],
        )
    }

    async fn lease_holder(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.system.client.clone(), &self.system.ns);
        leases
            .get_opt("sandbox-controller")
            .await
            .expect("reading the Lease")
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty())
    }
}

/// Lines of the controller's log that report a refusal by the apiserver's authorization.
fn forbidden_lines(controller: &ControllerProcess) -> Vec<String> {
    controller
        .log_text()
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("forbidden") || l.contains("code: 403")
        })
        .map(str::to_owned)
        .collect()
}

fn assert_never_forbidden(controller: &ControllerProcess) {
    let lines = forbidden_lines(controller);
    assert!(
        lines.is_empty(),
        "the deployed RBAC is missing a right ({}):\n{}",
        controller.log.display(),
        lines.join("\n")
    );
}

/// A `bash -c` task that appends a line to `file` each time it starts, then keeps running.
fn counting_task(file: &Path) -> String {
    format!(
        "  taskTemplate:\n    spec:\n      process:\n        command: [\"bash\"]\n        args: [\"-c\", \"echo started >> {}; exec sleep 600\"]\n",
        file.display()
    )
}

fn pooled_batch(name: &str, pool: &str, replicas: i32, extra_spec: &str) -> String {
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  poolRef: {pool}\n{extra_spec}"
    )
}

fn template_batch(name: &str, replicas: i32, extra_spec: &str) -> String {
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  template:\n    spec:\n      containers:\n      - name: sandbox\n        image: opensandbox/code-interpreter:v1.0.1\n{extra_spec}"
    )
}

fn expire_in(seconds: i64) -> String {
    let at = Timestamp::from_second(Timestamp::now().as_second() + seconds).expect("time");
    format!("  expireTime: \"{at}\"\n")
}

fn starts(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .count()
}

/// Pool `p`, a pooled batch `pooled` of 2 and a template batch `plain` of `plain` replicas, all
/// running counting tasks that write to `files`; returns once every task runs.
async fn running_scene(env: &TestEnv, files: &Path, plain: i32) {
    env.apply(&fixtures::pool("p", [2, 4, 2, 8]).yaml());
    wait_pool_idle(env, "p", 2).await;
    env.apply(&pooled_batch(
        "pooled",
        "p",
        2,
        &counting_task(&files.join("pooled")),
    ));
    env.apply(&template_batch(
        "plain",
        plain,
        &counting_task(&files.join("plain")),
    ));
    wait_running(env, "pooled", 2).await;
    wait_running(env, "plain", plain).await;
}

/// Waits until `name` has `n` ready sandboxes and `n` running tasks.
async fn wait_running(env: &TestEnv, name: &str, n: i32) {
    env.wait_for(
        &format!("{name}: {n} ready, {n} tasks running"),
        T,
        || async {
            let batch = env.batch(name).await;
            let status = batch
                .as_ref()
                .and_then(|b| b.status.clone())
                .unwrap_or_default();
            (status.ready == n && status.replicas == n && status.task_running == n)
                .then_some(())
                .ok_or_else(|| format!("{status:?}"))
        },
    )
    .await;
}

async fn wait_gone_batch(env: &TestEnv, name: &str) {
    env.wait_for(&format!("BatchSandbox {name} to be gone"), T, || async {
        env.batch(name).await.is_none()
    })
    .await;
}

async fn wait_pool_idle(env: &TestEnv, name: &str, idle: i32) {
    env.wait_for(&format!("Pool {name}: {idle} idle pods"), T, || async {
        let status = env
            .pool(name)
            .await
            .and_then(|p| p.status)
            .unwrap_or_default();
        (status.available >= idle)
            .then_some(())
            .ok_or_else(|| format!("{status:?}"))
    })
    .await;
}

/// The names of the pods of a template batch, by pod name, with their UIDs.
async fn owned_pods(env: &TestEnv, batch: &str) -> BTreeMap<String, String> {
    env.live_pods(MANAGED_PODS)
        .await
        .into_iter()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "BatchSandbox" && o.name == batch)
        })
        .map(|p| {
            (
                p.metadata.name.unwrap_or_default(),
                p.metadata.uid.unwrap_or_default(),
            )
        })
        .collect()
}

async fn pod_uids(env: &TestEnv) -> BTreeMap<String, String> {
    env.live_pods(MANAGED_PODS)
        .await
        .into_iter()
        .map(|p| {
            (
                p.metadata.name.unwrap_or_default(),
                p.metadata.uid.unwrap_or_default(),
            )
        })
        .collect()
}

async fn event_reasons(env: &TestEnv) -> BTreeSet<String> {
    env.kubectl_ok(&[
        "get",
        "events.events.k8s.io",
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_needs_no_right_beyond_the_deployed_rbac() {
    let env = harness::env("deploy_rbac").await;
    let identity = deployed_identity(&env).await;
    let certs = tempfile::tempdir().expect("temp dir");
    let mut controller = identity.start(
        &env,
        Path::new(env!("CARGO_BIN_EXE_sandbox-controller")),
        certs.path(),
    );
    let files = env.scratch();

    // An unscoped controller lists and watches across namespaces: granted at cluster scope.
    for resource in [
        "batchsandboxes.sandbox.opensandbox.io",
        "pools.sandbox.opensandbox.io",
        "pods",
    ] {
        for verb in ["list", "watch"] {
            let out =
                identity.kubectl_as(&env, &["auth", "can-i", verb, resource, "--all-namespaces"]);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "yes",
                "{verb} {resource} in all namespaces: {out:?}"
            );
        }
    }

    // Leader election: the Lease in the controller's namespace names this process.
    let holder = env
        .wait_for("the controller to take the Lease", T, || {
            identity.lease_holder()
        })
        .await;
    assert!(
        holder.ends_with(&format!("-{}", controller.pid())),
        "Lease held by {holder}"
    );
    // Webhook registration, and the webhook answers for the namespace.
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    let name = Registration::scoped_name(registration::DEFAULT_CONFIGURATION_NAME, &env.ns);
    env.wait_for("the webhook registration", T, || async {
        configurations.get_opt(&name).await.ok().flatten()
    })
    .await;
    let _cleanup = RemoveConfiguration(env.kubectl_cmd(&[
        "delete",
        "validatingwebhookconfiguration",
        &name,
        "--ignore-not-found",
    ]));
    let refused = env.kubectl_stdin(
        &["apply", "--server-side", "-f", "-"],
        &harness::in_namespace(&pooled_batch("expired", "p", 1, &expire_in(-3600)), &env.ns),
    );
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("admission webhook"),
        "the webhook refuses an expireTime in the past: {refused:?}"
    );

    // A pool, a pooled batch and a template batch, both running tasks.
    running_scene(&env, &files, 2).await;

    // Scale through the scale subresource, both ways.
    env.kubectl_ok(&["scale", "batchsandbox", "pooled", "--replicas=3"]);
    env.kubectl_ok(&["scale", "batchsandbox", "plain", "--replicas=1"]);
    wait_running(&env, "pooled", 3).await;
    wait_running(&env, "plain", 1).await;
    env.wait_for("plain's second pod to go", T, || async {
        owned_pods(&env, "plain").await.len() == 1
    })
    .await;

    // Expiry: deleted at expireTime, its pod recycled.
    env.apply(&pooled_batch("expiring", "p", 1, &expire_in(15)));
    env.wait_batch_ready("expiring", 1, T).await;
    wait_gone_batch(&env, "expiring").await;

    // Deletion: tasks stopped, pods released or deleted, finalizers removed, the pool goes.
    env.kubectl_ok(&["delete", "batchsandbox", "pooled", "plain", "--wait=false"]);
    wait_gone_batch(&env, "pooled").await;
    wait_gone_batch(&env, "plain").await;
    env.kubectl_ok(&["delete", "pool", "p", "--wait=false"]);
    env.wait_for("the pool to be gone", T, || async {
        env.pool("p").await.is_none()
    })
    .await;
    env.wait_for("every pod to be gone", T, || async {
        env.pods()
            .list(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(1)
            == 0
    })
    .await;

    let reasons = event_reasons(&env).await;
    for reason in ["PodsCreated", "ScaledDown", "Expired"] {
        assert!(reasons.contains(reason), "no {reason} event: {reasons:?}");
    }

    // Leaving releases the Lease (a patch) and keeps the registration.
    assert!(
        controller.terminate(Duration::from_secs(30)),
        "the controller exits cleanly on SIGTERM"
    );
    assert_never_forbidden(&controller);
}

/// Runs a kubectl command when dropped (cluster-scoped cleanup a failed test must not skip).
struct RemoveConfiguration(Command);

impl Drop for RemoveConfiguration {
    fn drop(&mut self) {
        let _ = self.0.stdin(Stdio::null()).output();
    }
}

/// An upgrade in the rolling update's order (`maxSurge: 1, maxUnavailable: 0`): the new binary
/// starts as a follower next to the old leader, the old one gets SIGTERM and releases the Lease,
/// the new one takes it, lists everything afresh and carries on. The new binary is a copy of this
/// build at another path: the controller keeps nothing between processes except what is in the
/// cluster (ledgers, finalizers, status, the Lease), so what an upgrade can lose is what a
/// process handover loses, and a copy makes sure the new process shares no file or memory with
/// the old one. Live at the handover: a pool, a pooled and a template batch with running tasks,
/// and a batch whose expireTime comes after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_binary_takes_over_mid_run_and_loses_nothing() {
    let env = harness::env("deploy_upgrade").await;
    let identity = deployed_identity(&env).await;
    let certs = tempfile::tempdir().expect("temp dir");
    let old_binary = PathBuf::from(env!("CARGO_BIN_EXE_sandbox-controller"));
    let mut old = identity.start(&env, &old_binary, certs.path());
    let name = Registration::scoped_name(registration::DEFAULT_CONFIGURATION_NAME, &env.ns);
    let _cleanup = RemoveConfiguration(env.kubectl_cmd(&[
        "delete",
        "validatingwebhookconfiguration",
        &name,
        "--ignore-not-found",
    ]));
    let files = env.scratch();
    let (pooled_starts, plain_starts) = (files.join("pooled"), files.join("plain"));

    env.apply(&fixtures::pool("p", [2, 4, 2, 10]).yaml());
    wait_pool_idle(&env, "p", 2).await;
    env.apply(&pooled_batch(
        "pooled",
        "p",
        2,
        &counting_task(&pooled_starts),
    ));
    env.apply(&template_batch("plain", 2, &counting_task(&plain_starts)));
    wait_running(&env, "pooled", 2).await;
    wait_running(&env, "plain", 2).await;
    // Far enough ahead to be pending through the handover (which takes a few seconds: the
    // old leader releases the Lease on exit, so the new one need not wait for it to lapse).
    let expiring_at = Timestamp::now().as_second() + 40;
    env.apply(&pooled_batch(
        "expiring",
        "p",
        1,
        &format!(
            "  expireTime: \"{}\"\n",
            Timestamp::from_second(expiring_at).expect("time")
        ),
    ));
    env.wait_batch_ready("expiring", 1, T).await;

    let pooled_before = ledger(&env.batch("pooled").await.expect("pooled"));
    let expiring_before = ledger(&env.batch("expiring").await.expect("expiring"));
    let plain_before = owned_pods(&env, "plain").await;
    let uids_before = pod_uids(&env).await;
    assert_eq!(
        (
            pooled_before.len(),
            expiring_before.len(),
            plain_before.len()
        ),
        (2, 1, 2)
    );
    assert_eq!((starts(&pooled_starts), starts(&plain_starts)), (2, 2));

    // The new binary, as a follower.
    let next = tempfile::tempdir().expect("temp dir");
    let new_binary = next.path().join("sandbox-controller-next");
    std::fs::copy(&old_binary, &new_binary).expect("copying the binary");
    let mut new = identity.start(&env, &new_binary, certs.path());
    env.wait_for("the new replica to wait for the Lease", T, || async {
        new.log_text().contains("waiting for leadership")
    })
    .await;
    assert!(
        identity
            .lease_holder()
            .await
            .is_some_and(|h| h.ends_with(&format!("-{}", old.pid()))),
        "the old replica still leads"
    );
    assert!(
        old.terminate(Duration::from_secs(30)),
        "the old replica exits cleanly on SIGTERM"
    );
    let new_pid = new.pid();
    env.wait_for("the new replica to take the Lease", T, || async {
        identity
            .lease_holder()
            .await
            .filter(|h| h.ends_with(&format!("-{new_pid}")))
    })
    .await;
    assert!(
        Timestamp::now().as_second() < expiring_at,
        "the handover took until after expireTime; the test proves nothing about pending expiry"
    );

    // The new leader allocates (so it has listed and reconciled) without touching what was held.
    env.kubectl_ok(&["scale", "batchsandbox", "pooled", "--replicas=3"]);
    wait_running(&env, "pooled", 3).await;
    let pooled_after = ledger(&env.batch("pooled").await.expect("pooled"));
    assert_eq!(
        pooled_after[..2],
        pooled_before[..],
        "pooled kept its pods, in order"
    );
    assert_eq!(
        ledger(&env.batch("expiring").await.expect("expiring")),
        expiring_before
    );
    assert_eq!(
        owned_pods(&env, "plain").await,
        plain_before,
        "plain kept its pods"
    );
    let uids_after = pod_uids(&env).await;
    for (pod, uid) in pooled_before
        .iter()
        .chain(&expiring_before)
        .chain(plain_before.keys())
        .map(|p| (p, &uids_before[p]))
    {
        assert_eq!(
            uids_after.get(pod),
            Some(uid),
            "pod {pod} was replaced or deleted"
        );
    }
    // Tasks were not started again: one start per shard (the pooled third is new).
    wait_running(&env, "plain", 2).await;
    assert_eq!((starts(&pooled_starts), starts(&plain_starts)), (3, 2));

    // No pod is held twice, and every pod is accounted for: held by one batch or in the pool.
    let pooled_now = ledger(&env.batch("pooled").await.expect("pooled"));
    let expiring_now = ledger(&env.batch("expiring").await.expect("expiring"));
    let held: Vec<&String> = pooled_now.iter().chain(&expiring_now).collect();
    let distinct: BTreeSet<&String> = held.iter().copied().collect();
    assert_eq!(distinct.len(), held.len(), "a pod held twice: {held:?}");
    // The Pool's status is written at most once a second, behind claims and refills: it must
    // come to count exactly the held pods and every live pod of the pool.
    env.wait_for("the pool status to account for every pod", T, || async {
        let status = env.pool("p").await.and_then(|p| p.status);
        let pool_pods = env
            .live_pods("sandbox.opensandbox.io/pool-name=p")
            .await
            .len();
        status.filter(|s| s.allocated as usize == held.len() && s.total as usize == pool_pods)
    })
    .await;

    // Expiry still fires, at its time, under the new leader.
    wait_gone_batch(&env, "expiring").await;
    assert!(Timestamp::now().as_second() >= expiring_at);

    env.kubectl_ok(&["delete", "batchsandbox", "--all", "--wait=false"]);
    wait_gone_batch(&env, "pooled").await;
    wait_gone_batch(&env, "plain").await;
    env.kubectl_ok(&["delete", "pool", "p", "--wait=false"]);
    env.wait_for("every pod to be gone", T, || async {
        env.pods()
            .list(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(1)
            == 0
    })
    .await;
    assert!(new.terminate(Duration::from_secs(30)));
    assert_never_forbidden(&old);
    assert_never_forbidden(&new);
}

/// docs/deploy.md's uninstall order, step by step, with the controller of the install running
/// until step 3: BatchSandboxes (their finalizers stop tasks and give pods back), then Pools
/// (theirs delete the idle pods), then the controller and its webhook registration. Ends with no
/// object of either kind, no pod, and nothing Terminating or holding a finalizer. The last step,
/// deleting the CRDs, is not taken here: other tests share them; with no object left it has
/// nothing to wait for.
#[tokio::test(flavor = "multi_thread")]
async fn uninstalling_in_the_documented_order_leaves_nothing_behind() {
    let env = harness::env("deploy_uninstall").await;
    let identity = deployed_identity(&env).await;
    let certs = tempfile::tempdir().expect("temp dir");
    let mut controller = identity.start(
        &env,
        Path::new(env!("CARGO_BIN_EXE_sandbox-controller")),
        certs.path(),
    );
    let name = Registration::scoped_name(registration::DEFAULT_CONFIGURATION_NAME, &env.ns);
    let _cleanup = RemoveConfiguration(env.kubectl_cmd(&[
        "delete",
        "validatingwebhookconfiguration",
        &name,
        "--ignore-not-found",
    ]));
    let files = env.scratch();
    running_scene(&env, &files, 1).await;

    // 1. BatchSandboxes, waiting until they are gone. (`-A` in the docs; one namespace here.)
    env.kubectl_ok(&[
        "delete",
        "batchsandboxes",
        "--all",
        "--wait",
        "--timeout=90s",
    ]);
    // 2. Pools, likewise; then their pods.
    env.kubectl_ok(&["delete", "pools", "--all", "--wait", "--timeout=90s"]);
    env.kubectl_ok(&[
        "wait",
        "--for=delete",
        "pods",
        "-l",
        MANAGED_PODS,
        "--timeout=90s",
    ]);
    // 3. The controller, and (self-managed registration) its webhook configuration.
    assert!(controller.terminate(Duration::from_secs(30)));
    env.kubectl_ok(&["delete", "validatingwebhookconfiguration", &name]);

    for kind in [
        "batchsandboxes.sandbox.opensandbox.io",
        "pools.sandbox.opensandbox.io",
        "pods",
    ] {
        let left = env.kubectl_ok(&["get", kind, "-o", "name"]);
        assert_eq!(left.trim(), "", "{kind} left after uninstalling");
    }
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    assert!(
        configurations
            .get_opt(&name)
            .await
            .expect("reading")
            .is_none()
    );
    // The namespace itself goes without waiting on anything.
    env.kubectl_ok(&["delete", "namespace", &env.ns, "--wait", "--timeout=60s"]);
    assert_never_forbidden(&controller);
}
