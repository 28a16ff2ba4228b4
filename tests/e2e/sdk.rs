//! OpenSandbox's own lifecycle server (`opensandbox-server` 1.1.1) and Python SDK (`opensandbox`
//! 1.1.1), both from PyPI (cached under ~/.cache/sbx-sdk), against the test cluster: the server
//! runs on a loopback port and creates BatchSandboxes in the test's namespace, our controller runs
//! them, the local runner serves the in-sandbox command API on the pod's 127.1.x.y address, and the
//! spec's batch_example.py runs as written.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;
use sandbox_domain::api::{BatchSandbox, names};

use crate::controller::ledger;
use crate::harness::{TestEnv, dev_dir, env, repo_root, spec_manifest};

const T: Duration = Duration::from_secs(120);
/// The label OpenSandbox's server puts on every BatchSandbox (and template) it creates.
const SANDBOX_ID_LABEL: &str = "opensandbox.io/id";

/// The virtual environment with both packages (installed once per machine by sdk.sh).
fn venv() -> PathBuf {
    let out = Command::new(repo_root().join("deploy/opensandbox/sdk.sh"))
        .arg("venv")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("running deploy/opensandbox/sdk.sh venv");
    assert!(out.status.success(), "sdk.sh venv failed: {}", out.status);
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `opensandbox-server` for the test's namespace on 127.0.0.1; killed when dropped.
struct OpenSandboxServer {
    child: Child,
    venv: PathBuf,
    port: u16,
    api_key: String,
    log: PathBuf,
    _state: tempfile::TempDir,
}

impl OpenSandboxServer {
    fn start(env: &TestEnv) -> Self {
        let venv = venv();
        let state = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let api_key = format!("key-{}", env.ns);
        let config = state.path().join("config.toml");
        let out = Command::new(repo_root().join("deploy/opensandbox/sdk.sh"))
            .arg("config")
            .arg(&config)
            .args(["--port", &port.to_string(), "--namespace", &env.ns])
            .arg("--kubeconfig")
            .arg(&env.kubeconfig)
            .arg("--state")
            .arg(state.path())
            .args(["--api-key", &api_key])
            .output()
            .expect("running sdk.sh config");
        assert!(
            out.status.success(),
            "sdk.sh config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let logs = dev_dir().join("logs");
        std::fs::create_dir_all(&logs).expect("log dir");
        let log = logs.join(format!("opensandbox-server-{}.log", env.ns));
        let file = std::fs::File::create(&log).expect("server log");
        let child = Command::new(venv.join("bin/opensandbox-server"))
            .arg("--config")
            .arg(&config)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("starting opensandbox-server");
        let mut server = OpenSandboxServer {
            child,
            venv,
            port,
            api_key,
            log,
            _state: state,
        };
        server.wait_healthy();
        server
    }

    fn wait_healthy(&mut self) {
        let start = Instant::now();
        loop {
            if http_get(self.port, "/health").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "opensandbox-server exited ({status}); see {}",
                    self.log.display()
                );
            }
            assert!(
                start.elapsed() < T,
                "opensandbox-server not healthy after {T:?}; see {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a Python script with the SDK's environment, as the spec's `uv run python` would.
    fn python(&self, script: &Path) -> Child {
        Command::new(self.venv.join("bin/python"))
            .arg(script)
            .env("SANDBOX_DOMAIN", format!("127.0.0.1:{}", self.port))
            .env("SANDBOX_API_KEY", &self.api_key)
            .env("OPENSANDBOX_DISABLE_METRICS", "1")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting python")
    }
}

impl Drop for OpenSandboxServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1; the raw response, or `None` if nothing answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Every version of every BatchSandbox in the namespace, as seen by a watch, with the time it
/// was seen.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Instant, BatchSandbox)>>>);

impl Seen {
    /// Starts watching; returns once the watch has listed the namespace.
    async fn watch(env: &TestEnv) -> (Self, tokio::task::JoinHandle<()>) {
        let seen = Seen::default();
        let api: Api<BatchSandbox> = Api::namespaced(env.client.clone(), &env.ns);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut events = watcher(api, watcher::Config::default()).boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                    Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) => {
                        record
                            .0
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((Instant::now(), b));
                    }
                    _ => {}
                }
            }
        });
        ready_rx
            .await
            .expect("the BatchSandbox watch listed the namespace");
        (seen, task)
    }

    fn all(&self) -> Vec<(Instant, BatchSandbox)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The versions of the one BatchSandbox OpenSandbox's server created.
    fn server_batch(&self) -> Vec<(Instant, BatchSandbox)> {
        let all = self.all();
        let names: std::collections::BTreeSet<String> = all
            .iter()
            .filter(|(_, b)| labels(b).contains_key(SANDBOX_ID_LABEL))
            .filter_map(|(_, b)| b.metadata.name.clone())
            .collect();
        assert_eq!(
            names.len(),
            1,
            "exactly one BatchSandbox from OpenSandbox's server: {names:?}"
        );
        all.into_iter()
            .filter(|(_, b)| b.metadata.name.as_ref() == names.first())
            .collect()
    }
}

fn labels(batch: &BatchSandbox) -> BTreeMap<String, String> {
    batch.metadata.labels.clone().unwrap_or_default()
}

fn annotation<'a>(batch: &'a BatchSandbox, key: &str) -> Option<&'a str> {
    batch
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// A log line without its terminal colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits for a child process on a blocking thread.
async fn finish(child: Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("waiting for python")
}

fn check_output(out: &Output, server: &OpenSandboxServer) {
    assert!(
        out.status.success(),
        "the example failed ({}):\nstdout:\n{}\nstderr:\n{}\nserver log: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log.display()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Output: hello from batch sandbox\n",
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The time from the server's create to the first version OpenSandbox's server would call
/// Running (`ready == 1` and an IP in the endpoints annotation).
fn time_to_running(versions: &[(Instant, BatchSandbox)]) -> Option<Duration> {
    let (created, _) = versions.first()?;
    versions
        .iter()
        .find(|(_, b)| {
            b.status.as_ref().is_some_and(|s| s.ready == 1)
                && annotation(b, names::ANNOTATION_ENDPOINTS)
                    .and_then(|e| serde_json::from_str::<Vec<String>>(e).ok())
                    .is_some_and(|ips| ips.first().is_some_and(|ip| ip.starts_with("127.")))
        })
        .map(|(t, _)| t.duration_since(*created))
}

async fn wait_gone(env: &TestEnv, name: &str) {
    env.wait_for(&format!("BatchSandbox {name} to be gone"), T, || async {
        env.batch(name).await.is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_spec_batch_example_runs_unchanged_through_opensandbox_server() {
    let env = env("sdk-template").await;
    let _controller = env.start_controller(&[]);
    let server = OpenSandboxServer::start(&env);
    let (seen, _watch) = Seen::watch(&env).await;

    let started = Instant::now();
    let out = finish(server.python(&repo_root().join("examples/sdk/batch_example.py"))).await;
    let took = started.elapsed();
    check_output(&out, &server);

    let versions = seen.server_batch();
    let (_, first) = &versions[0];
    let name = first.metadata.name.clone().expect("name");
    assert_eq!(labels(first).get(SANDBOX_ID_LABEL), Some(&name));
    let template = first.spec.template.as_ref().expect("template mode");
    let pod_spec = template.spec.as_ref().expect("pod spec");
    assert_eq!(
        pod_spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["execd-installer"]
    );
    assert_eq!(
        pod_spec.containers[0].command.as_deref(),
        Some(&["/opt/opensandbox/bootstrap.sh", "tail", "-f", "/dev/null"].map(String::from)[..])
    );
    assert!(
        first.spec.expire_time.is_some(),
        "timeout=10 min sets expireTime"
    );
    let running = time_to_running(&versions).expect(
        "a version with ready=1 and the endpoints annotation as a list of IP strings (the server's format)",
    );
    eprintln!(
        "sdk-template: create -> Running {running:?}; whole example (create, run, kill) {took:?}"
    );

    wait_gone(&env, &name).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let selector = format!("{SANDBOX_ID_LABEL}={name}");
    env.wait_for("the sandbox's pod to be gone", T, || async {
        pods.list(&kube::api::ListParams::default().labels(&selector))
            .await
            .is_ok_and(|l| l.items.is_empty())
    })
    .await;
}

/// The spec's pool.yaml, optionally with a `recycleStrategy.type`.
fn fast_pool(recycle: Option<&str>) -> String {
    let pool = spec_manifest("pool");
    match recycle {
        None => pool,
        Some(policy) => pool.replace(
            "  capacitySpec:\n",
            &format!("  recycleStrategy:\n    type: {policy}\n  capacitySpec:\n"),
        ),
    }
}

/// Runs examples/sdk/pool_example.py against `fast-pool` (warm) and returns the pod it got,
/// after checking how the batch looked and that the pod came from the warm pool in time.
async fn pool_example(env: &TestEnv, recycle: Option<&str>) -> (String, String) {
    env.apply(&fast_pool(recycle));
    env.wait_for("fast-pool to be warm (10 available)", T, || async {
        env.pool("fast-pool")
            .await
            .and_then(|p| p.status)
            .is_some_and(|s| s.available == 10 && s.total == 10)
    })
    .await;
    let warm: Vec<String> = env
        .live_pods(&format!("{}=fast-pool", names::LABEL_POOL_NAME))
        .await
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let server = OpenSandboxServer::start(env);
    let (seen, _watch) = Seen::watch(env).await;

    let out = finish(server.python(&repo_root().join("examples/sdk/pool_example.py"))).await;
    check_output(&out, &server);

    let versions = seen.server_batch();
    let (_, first) = &versions[0];
    let name = first.metadata.name.clone().expect("name");
    assert_eq!(first.spec.pool_ref.as_deref(), Some("fast-pool"));
    let task = serde_json::to_value(&first.spec.task_template).expect("task template");
    assert_eq!(
        task["spec"]["process"]["command"],
        serde_json::json!([
            "/bin/sh",
            "-c",
            "exec /opt/opensandbox/bootstrap.sh tail -f /dev/null"
        ])
    );
    let pod = versions
        .iter()
        .map(|(_, b)| ledger(b))
        .find(|l| !l.is_empty())
        .and_then(|l| l.first().cloned())
        .expect("the batch got a pod");
    assert!(
        warm.contains(&pod),
        "{pod} came from the warm pool {warm:?}"
    );
    let running = time_to_running(&versions).expect("Running as the server reads it");
    assert!(
        versions
            .iter()
            .all(|(_, b)| b.status.as_ref().is_none_or(|s| s.task_failed == 0)),
        "the task never failed"
    );
    // The task ran bootstrap.sh until the kill stopped it: the pod's executor reports it
    // terminated as Stopped (a missing bootstrap.sh would have ended it at once with 127).
    let runner_log = env
        .kubeconfig
        .with_file_name("logs")
        .join("executor-runner.log");
    let prefix = format!("[{}/{pod}]", env.ns);
    let terminated = env
        .wait_for(
            "the pod's executor to log how the task ended",
            T,
            || async {
                std::fs::read_to_string(&runner_log)
                    .ok()?
                    .lines()
                    .filter(|l| l.starts_with(&prefix) && l.contains("task terminated"))
                    .map(strip_ansi)
                    .next()
            },
        )
        .await;
    assert!(
        terminated.contains("reason=Stopped") && !terminated.contains("exit_code=127"),
        "bootstrap.sh ran as the sandbox's task until the kill stopped it: {terminated}"
    );
    eprintln!("sdk-pool ({recycle:?}): create -> Running from the warm pool in {running:?}");
    assert!(
        running < Duration::from_secs(1),
        "a warm pool hands out a sandbox in under a second (the spec's figure); took {running:?}"
    );
    wait_gone(env, &name).await;
    (name, pod)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_example_gets_a_warm_pod_whose_pod_is_deleted_after_kill() {
    let env = env("sdk-pool-delete").await;
    let _controller = env.start_controller(&[]);
    let (_, pod) = pool_example(&env, None).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    env.wait_for(
        &format!("pod {pod} to be deleted (recycle: Delete)"),
        T,
        || async {
            pods.get_opt(&pod)
                .await
                .is_ok_and(|p| p.is_none_or(|p| p.metadata.deletion_timestamp.is_some()))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_example_returns_its_pod_to_a_noop_recycling_pool_after_kill() {
    let env = env("sdk-pool-noop").await;
    let _controller = env.start_controller(&[]);
    let (_, pod) = pool_example(&env, Some("Noop")).await;
    env.wait_for(
        &format!("pod {pod} to be idle in fast-pool again"),
        T,
        || async {
            let pool = env.pool("fast-pool").await;
            let live = env
                .live_pods(&format!("{}=fast-pool", names::LABEL_POOL_NAME))
                .await;
            let batches = env.batches().list(&Default::default()).await;
            live.iter()
                .any(|p| p.metadata.name.as_deref() == Some(pod.as_str()))
                && batches.is_ok_and(|b| b.items.is_empty())
                && pool
                    .and_then(|p| p.status)
                    .is_some_and(|s| s.allocated == 0)
        },
    )
    .await;
}

/// An executor started with `--mount` gives its tasks `/opt/opensandbox` from a directory of its
/// own (as a pod volume would), while the machine's `/opt` stays as it was. No cluster needed.
#[tokio::test]
async fn an_executors_mount_gives_its_tasks_a_private_opt_opensandbox() {
    use sandbox_executor::ExecutorClient;

    use crate::executor::{task, wait_task};

    let host_had_it = Path::new("/opt/opensandbox").exists();
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("opensandbox-bin");
    std::fs::create_dir_all(&volume).expect("volume");
    std::fs::copy(
        repo_root().join("deploy/opensandbox/bootstrap.sh"),
        volume.join("bootstrap.sh"),
    )
    .expect("bootstrap.sh");
    let ready = dir.path().join("ready");
    let mut child = Command::new(crate::harness::workspace_bin("sandbox-task-executor"))
        .args(["--listen", "127.0.0.1:0", "--stop-tasks-on-exit"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--allow-unauthenticated")
        .arg("--ready-file")
        .arg(&ready)
        .arg("--mount")
        .arg(format!("{}:/opt/opensandbox", volume.display()))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting sandbox-task-executor");
    let start = Instant::now();
    let port: u16 = loop {
        if let Some(port) = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|a| a.rsplit(':').next().and_then(|p| p.trim().parse().ok()))
        {
            break port;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("sandbox-task-executor exited at start: {status}");
        }
        assert!(start.elapsed() < T, "executor not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = ExecutorClient::new(None).with_port(port);
    let pod = sandbox_executor::PodRef {
        ip: "127.0.0.1",
        uid: "mount-test",
    };
    let tasks = vec![task(
        "boot",
        &[
            "/bin/sh",
            "-c",
            "exec /opt/opensandbox/bootstrap.sh echo started through bootstrap.sh",
        ],
    )];
    client.set_tasks(pod, &tasks).await.expect("setTasks");
    let done = wait_task(&client, pod, "boot", "terminated", |t| t.is_terminated()).await;
    let _ = child.kill();
    let _ = child.wait();
    let stdout =
        std::fs::read_to_string(dir.path().join("data/tasks/boot/stdout.log")).unwrap_or_default();
    assert_eq!(stdout, "started through bootstrap.sh\n", "{done:?}");
    assert_eq!(
        Path::new("/opt/opensandbox").exists(),
        host_had_it,
        "the machine's /opt is unchanged"
    );
}

/// The pool-mode example is the spec's, with the one argument that selects the pool.
#[test]
fn the_pool_example_is_the_spec_example_plus_the_pool_extension() {
    let read = |p: &str| std::fs::read_to_string(repo_root().join(p)).expect(p);
    let spec = read("examples/sdk/batch_example.py");
    let pool = read("examples/sdk/pool_example.py");
    let extra = "        extensions={\"poolRef\": \"fast-pool\"},\n";
    let anchor = "        timeout=timedelta(minutes=10),\n";
    assert_eq!(spec.matches(anchor).count(), 1);
    assert_eq!(pool, spec.replace(anchor, &format!("{anchor}{extra}")));
}
