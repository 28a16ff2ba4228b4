//! The local executor runner of the control plane (`sandbox-controller local-executors`, started
//! by `deploy/local/cluster.sh up`): kwok pods that need a task executor get a real one on their
//! 127.1.x.y IP, and lose it (tasks included) when they go away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use sandbox_decisions::tasks::TaskPhase;
use sandbox_executor::credential::{Seed, SigningKey, read_key_file};
use sandbox_executor::{ExecutorClient, ExecutorError, PodRef, Task};

use crate::executor::{alive, task, wait_task};
use crate::harness::{TestEnv, env};

const T: Duration = Duration::from_secs(60);

fn pod_yaml(name: &str, with_executor: bool) -> String {
    let executor = if with_executor {
        "\n  - name: task-executor\n    image: sandbox-task-executor:dev"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: app\n    image: busybox{executor}\n"
    )
}

/// The state directory of the cluster under test (its kubeconfig lives there).
fn cluster_dir(env: &TestEnv) -> PathBuf {
    env.kubeconfig
        .parent()
        .expect("kubeconfig in the state directory")
        .to_path_buf()
}

/// The pod's IP once it is Running, and its UID.
async fn running_pod(env: &TestEnv, name: &str) -> (String, String) {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    env.wait_for(&format!("pod {name} Running with an IP"), T, || async {
        let pod = pods.get(name).await.ok()?;
        let uid = pod.metadata.uid?;
        let status = pod.status?;
        (status.phase.as_deref() == Some("Running")).then_some(())?;
        Some((status.pod_ip.filter(|ip| !ip.is_empty())?, uid))
    })
    .await
}

/// The controller's side: the runner's signing key (`.dev/executor-signing-key`).
async fn controller_key(env: &TestEnv, dir: &Path) -> Arc<SigningKey> {
    let path = dir.join("executor-signing-key");
    let seed: Seed = env
        .wait_for("the runner's signing key", T, || async {
            read_key_file::<Seed>(&path).ok()
        })
        .await;
    Arc::new(SigningKey::from_seed(&seed).expect("signing key"))
}

/// A scratch directory tasks (which run as another user) may write into.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    dir
}

#[tokio::test]
async fn kwok_pods_get_a_real_executor_that_goes_with_the_pod() {
    let env = env("local-executors").await;
    let dir = cluster_dir(&env);
    let key = controller_key(&env, &dir).await;
    env.apply(&pod_yaml("with-executor", true));
    env.apply(&pod_yaml("without-executor", false));
    let (ip, uid) = running_pod(&env, "with-executor").await;
    let (other_ip, _) = running_pod(&env, "without-executor").await;
    assert!(ip.starts_with("127."), "kwok pod IPs are loopback: {ip}");
    let pod = PodRef { ip: &ip, uid: &uid };

    let client = ExecutorClient::new(Some(key));
    env.wait_for("the pod's executor to answer", T, || client.get_tasks(pod))
        .await;
    let error = ExecutorClient::new(None).get_tasks(pod).await.unwrap_err();
    assert!(
        matches!(error, ExecutorError::Unauthorized { .. }),
        "the runner's executors require a credential: {error:?}"
    );
    let error = client.health(&other_ip).await.unwrap_err();
    assert!(
        error.is_unreachable(),
        "a pod without a task-executor container gets none: {error:?}"
    );

    let scratch = scratch();
    let pid_file = scratch.path().join("long.pid");
    let long = format!("echo $$ > {}; exec sleep 120", pid_file.display());
    let tasks: Vec<Task> = vec![
        task("hello", &["echo", "hello from", "kwok"]),
        task("long", &["sh", "-c", &long]),
    ];
    client.set_tasks(pod, &tasks).await.expect("setTasks");

    let hello = wait_task(&client, pod, "hello", "terminated", |t| t.is_terminated()).await;
    assert_eq!(hello.phase(), TaskPhase::Succeeded);
    let data = dir.join("executors").join(&env.ns).join("with-executor");
    let stdout = std::fs::read_to_string(data.join("tasks/hello/stdout.log")).expect("task output");
    assert_eq!(stdout, "hello from kwok\n");
    wait_task(&client, pod, "long", "running", |t| {
        t.phase() == TaskPhase::Running
    })
    .await;
    let long_pid: u32 = env
        .wait_for("the long task's pid", T, || async {
            std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        })
        .await;
    assert!(alive(long_pid));

    env.kubectl_ok(&["delete", "pod", "with-executor", "--wait=false"]);
    env.wait_for("the deleted pod's task to be stopped", T, || async {
        !alive(long_pid)
    })
    .await;
    env.wait_for("the deleted pod's executor to be gone", T, || async {
        client
            .get_tasks(pod)
            .await
            .is_err_and(|e| e.is_unreachable())
    })
    .await;
    env.wait_for(
        "the deleted pod's executor data to be removed",
        T,
        || async { !data.exists() },
    )
    .await;
}

/// A task in sandbox A takes whatever it can read (its environment, the environment and command
/// line of its supervisor, its executor and PID 1, every file those command lines name, the key
/// files) and tries each piece on sandbox B's executor, as it would after finding B by scanning.
/// B refuses all of it, as it refuses a genuine credential captured on its way to A, and its own
/// task keeps running.
#[tokio::test]
async fn nothing_a_task_can_read_opens_another_sandboxs_executor() {
    let env = env("executor-isolation").await;
    let dir = cluster_dir(&env);
    let key = controller_key(&env, &dir).await;
    env.apply(&pod_yaml("sandbox-a", true));
    env.apply(&pod_yaml("sandbox-b", true));
    let (ip_a, uid_a) = running_pod(&env, "sandbox-a").await;
    let (ip_b, uid_b) = running_pod(&env, "sandbox-b").await;
    let (a, b) = (
        PodRef {
            ip: &ip_a,
            uid: &uid_a,
        },
        PodRef {
            ip: &ip_b,
            uid: &uid_b,
        },
    );
    let client = ExecutorClient::new(Some(key.clone()));
    env.wait_for("A's executor to answer", T, || client.get_tasks(a))
        .await;
    env.wait_for("B's executor to answer", T, || client.get_tasks(b))
        .await;
    client
        .set_tasks(b, &[task("b-own", &["sleep", "300"])])
        .await
        .expect("B's own task");
    wait_task(&client, b, "b-own", "running", |t| {
        t.phase() == TaskPhase::Running
    })
    .await;

    let signing_key = dir.join("executor-signing-key");
    let loot = format!(
        r#"echo "uid=$(id -u)"
env
shim=$PPID
executor=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$shim/status)
for pid in 1 $shim $executor; do
  if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null; then echo "environ-read $pid"; else echo "environ-denied $pid"; fi
  tr '\0' '\n' < /proc/$pid/cmdline 2>/dev/null; echo
done
for f in {signing} {public} $(tr '\0' '\n' < /proc/$executor/cmdline 2>/dev/null | tr ':' '\n' | grep '^/'); do
  if [ -d "$f" ] || [ -x "$f" ]; then continue; fi
  if cat "$f" 2>/dev/null; then echo; else echo "denied $f"; fi
done"#,
        signing = signing_key.display(),
        public = dir.join("executor-public-key").display()
    );
    client
        .set_tasks(a, &[task("loot", &["sh", "-c", &loot])])
        .await
        .expect("A's task");
    let done = wait_task(&client, a, "loot", "terminated", |t| t.is_terminated()).await;
    assert_eq!(done.phase(), TaskPhase::Succeeded, "{done:?}");
    let loot = std::fs::read(
        dir.join("executors")
            .join(&env.ns)
            .join("sandbox-a")
            .join("tasks/loot/stdout.log"),
    )
    .expect("the task's output");
    let loot = String::from_utf8_lossy(&loot);

    // What the task could and could not read.
    let seed = std::fs::read_to_string(&signing_key).expect("signing key");
    assert!(loot.contains("uid=65534"), "{loot}");
    assert!(
        loot.contains(&format!("denied {}", signing_key.display())),
        "{loot}"
    );
    assert!(!loot.contains(seed.trim()), "the signing key leaked");
    let executor_environ = loot
        .lines()
        .filter(|l| l.starts_with("environ-"))
        .collect::<Vec<_>>();
    assert_eq!(executor_environ.len(), 3, "{loot}");
    assert!(
        executor_environ[1..]
            .iter()
            .all(|l| l.starts_with("environ-denied")),
        "the supervisor's and the executor's environment stay closed: {executor_environ:?}"
    );

    // Everything it read, tried on B.
    let mut pieces: Vec<&str> = loot
        .split(|c: char| c.is_whitespace() || "=:,\"'".contains(c))
        .filter(|w| w.len() >= 8 && w.bytes().all(|b| b.is_ascii_graphic()))
        .collect();
    pieces.sort_unstable();
    pieces.dedup();
    assert!(pieces.len() > 10, "the task read next to nothing: {loot}");
    let captured_for_a = key.authorization(&uid_a, "POST", "/setTasks", b"[]", SystemTime::now());
    let mut attempts = vec![captured_for_a];
    for piece in pieces.iter().take(400) {
        attempts.push(format!("Bearer {piece}"));
        attempts.push(format!("Sandbox-Ed25519 {piece}"));
        attempts.push(piece.to_string());
    }
    for authorization in &attempts {
        let status = post_set_tasks(&ip_b, authorization, "[]").await;
        assert_eq!(status, 401, "B accepted {authorization:?}");
    }
    let tasks = client.get_tasks(b).await.expect("B's tasks");
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].name, "b-own");
    assert_eq!(
        tasks[0].phase(),
        TaskPhase::Running,
        "B's task kept running"
    );

    client.set_tasks(a, &[]).await.expect("stop A's tasks");
    client.set_tasks(b, &[]).await.expect("stop B's tasks");
}

/// `POST /setTasks` with `authorization` and `body` to the executor on `ip`; the status code.
async fn post_set_tasks(ip: &str, authorization: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((ip, sandbox_executor::EXECUTOR_PORT))
        .await
        .expect("connect");
    let request = format!(
        "POST /setTasks HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {authorization}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut response))
        .await
        .expect("an answer")
        .expect("read");
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text}"))
}
