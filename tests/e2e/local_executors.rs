//! The local executor runner of the control plane (`sandbox-controller local-executors`, started
//! by `deploy/local/cluster.sh up`): kwok pods that need a task executor get a real one on their
//! 127.1.x.y IP, and lose it (tasks included) when they go away.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use sandbox_decisions::tasks::TaskPhase;
use sandbox_executor::{ExecutorClient, Task};

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

async fn running_ip(env: &TestEnv, name: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    env.wait_for(&format!("pod {name} Running with an IP"), T, || async {
        let pod = pods.get(name).await.ok()?;
        let status = pod.status?;
        (status.phase.as_deref() == Some("Running")).then_some(())?;
        status.pod_ip.filter(|ip| !ip.is_empty())
    })
    .await
}

#[tokio::test]
async fn kwok_pods_get_a_real_executor_that_goes_with_the_pod() {
    let env = env("local-executors").await;
    let dir = cluster_dir(&env);
    let token = env
        .wait_for("the runner's token file", T, || async {
            std::fs::read_to_string(dir.join("executor-token")).ok()
        })
        .await;
    env.apply(&pod_yaml("with-executor", true));
    env.apply(&pod_yaml("without-executor", false));
    let ip = running_ip(&env, "with-executor").await;
    let other_ip = running_ip(&env, "without-executor").await;
    assert!(ip.starts_with("127."), "kwok pod IPs are loopback: {ip}");

    let client = ExecutorClient::new(Some(token.trim().to_string()));
    env.wait_for("the pod's executor to answer", T, || client.get_tasks(&ip))
        .await;
    let error = ExecutorClient::new(None).get_tasks(&ip).await.unwrap_err();
    assert!(
        matches!(error, sandbox_executor::ExecutorError::Unauthorized { .. }),
        "the runner's executors require the token: {error:?}"
    );
    let error = client.health(&other_ip).await.unwrap_err();
    assert!(
        error.is_unreachable(),
        "a pod without a task-executor container gets none: {error:?}"
    );

    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("long.pid");
    let long = format!("echo $$ > {}; exec sleep 120", pid_file.display());
    let tasks: Vec<Task> = vec![
        task("hello", &["echo", "hello from", "kwok"]),
        task("long", &["sh", "-c", &long]),
    ];
    client.set_tasks(&ip, &tasks).await.expect("setTasks");

    let hello = wait_task(&client, &ip, "hello", "terminated", |t| t.is_terminated()).await;
    assert_eq!(hello.phase(), TaskPhase::Succeeded);
    let data = dir.join("executors").join(&env.ns).join("with-executor");
    let stdout = std::fs::read_to_string(data.join("tasks/hello/stdout.log")).expect("task output");
    assert_eq!(stdout, "hello from kwok\n");
    wait_task(&client, &ip, "long", "running", |t| {
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
            .get_tasks(&ip)
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
