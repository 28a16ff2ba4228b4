//! The task executor as a real process (`sandbox-task-executor` on 127.0.0.1, port from the OS),
//! driven through the controller's client. No cluster needed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sandbox_decisions::tasks::TaskPhase;
use sandbox_executor::credential::{Seed, SigningKey};
use sandbox_executor::wire::{EnvVar, Process};
use sandbox_executor::{ExecutorClient, ExecutorError, PodRef, Task};

const T: Duration = Duration::from_secs(30);
/// The pod these executors believe they serve: requests are signed for it.
const LOCAL: PodRef<'static> = PodRef {
    ip: "127.0.0.1",
    uid: "0d8e2c55-e2e0-4c1a-9a57-executor0001",
};

/// A fresh controller signing key.
pub fn signing_key() -> Arc<SigningKey> {
    Arc::new(SigningKey::from_seed(&Seed::generate().expect("random seed")).expect("key"))
}

/// One executor process with its own data directory, serving pod [`LOCAL`] and trusting a
/// signing key of its own; stopped (with its tasks) on drop.
pub struct Executor {
    child: Option<Child>,
    dir: tempfile::TempDir,
    key: Arc<SigningKey>,
    port: u16,
    grace_seconds: u64,
    extra_args: Vec<String>,
}

impl Executor {
    pub fn start(grace_seconds: u64) -> Self {
        Self::start_with(grace_seconds, &[])
    }

    /// With more command-line arguments.
    pub fn start_with(grace_seconds: u64, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Tasks run as another user: they may write into the test's scratch directory.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .expect("chmod the scratch directory");
        let key = signing_key();
        std::fs::write(dir.path().join("public-key"), key.public_key().to_string())
            .expect("public key file");
        let mut executor = Executor {
            child: None,
            dir,
            key,
            port: 0,
            grace_seconds,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        executor.spawn();
        executor
    }

    /// Starts the executor process (again) on the same data directory; waits until it serves.
    pub fn spawn(&mut self) {
        let ready = self.dir.path().join("ready");
        let _ = std::fs::remove_file(&ready);
        let mut command = Command::new(crate::harness::workspace_bin("sandbox-task-executor"));
        command
            .args(["--listen", "127.0.0.1:0", "--stop-tasks-on-exit"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--ready-file")
            .arg(&ready)
            .args(["--kill-grace-seconds", &self.grace_seconds.to_string()])
            .arg("--controller-public-key-file")
            .arg(self.dir.path().join("public-key"))
            .args(["--pod-uid", LOCAL.uid])
            .args(&self.extra_args)
            .env_remove("EXECD_ACCESS_TOKEN")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        self.child = Some(command.spawn().expect("spawning sandbox-task-executor"));
        let start = Instant::now();
        let addr = loop {
            if let Ok(addr) = std::fs::read_to_string(&ready) {
                break addr;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("sandbox-task-executor exited at start: {status}");
            }
            assert!(start.elapsed() < T, "executor not ready after {T:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        self.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .expect("port in ready file");
    }

    /// SIGKILL, like a crash: no chance to clean up.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL the executor");
            child.wait().expect("reap the executor");
        }
    }

    pub fn client(&self) -> ExecutorClient {
        ExecutorClient::new(Some(self.key.clone())).with_port(self.port)
    }

    /// A credential for `POST /setTasks` with an empty body, signed for this executor's pod now.
    fn authorization(&self) -> String {
        self.key
            .authorization(LOCAL.uid, "POST", "/setTasks", b"", SystemTime::now())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What a task wrote to stdout.
    pub fn stdout(&self, task: &str) -> String {
        std::fs::read_to_string(self.data_dir().join("tasks").join(task).join("stdout.log"))
            .unwrap_or_default()
    }

    /// A scratch directory of this test.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM: with --stop-tasks-on-exit the executor stops its tasks before it exits.
        if let Some(pid) = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(self.grace_seconds + 10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

pub fn task(name: &str, command: &[&str]) -> Task {
    Task {
        name: name.into(),
        process: Some(Process {
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Process::default()
        }),
        ..Task::default()
    }
}

fn with_timeout(mut task: Task, seconds: i64) -> Task {
    task.process.as_mut().unwrap().timeout_seconds = Some(seconds);
    task
}

/// Polls `get_tasks` of the executor of `pod` until `task_name` satisfies `done`; returns that
/// task.
pub async fn wait_task(
    client: &ExecutorClient,
    pod: PodRef<'_>,
    task_name: &str,
    what: &str,
    done: impl Fn(&Task) -> bool,
) -> Task {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < T {
        match client.get_tasks(pod).await {
            Ok(tasks) => {
                if let Some(task) = tasks.iter().find(|t| t.name == task_name)
                    && done(task)
                {
                    return task.clone();
                }
                last = Some(format!("{tasks:?}"));
            }
            Err(error) => last = Some(error.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {task_name} never became {what} within {T:?}; last observation: {last:?}");
}

async fn wait_gone(client: &ExecutorClient, task_name: &str) {
    let start = Instant::now();
    loop {
        let tasks = client.get_tasks(LOCAL).await.expect("getTasks");
        if !tasks.iter().any(|t| t.name == task_name) {
            return;
        }
        assert!(
            start.elapsed() < T,
            "task {task_name} still listed after {T:?}: {tasks:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `path` holds a pid and returns it.
async fn read_pid(path: &Path) -> u32 {
    let start = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(start.elapsed() < T, "{} never got a pid", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True if `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.chars().next())
        .unwrap_or_default();
    !matches!(state, Some('Z' | 'X'))
}

async fn wait_dead(pid: u32, what: &str) {
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < T,
            "{what} (pid {pid}) still alive after {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn terminated(task: &Task) -> bool {
    task.is_terminated()
}

fn exit_of(task: &Task) -> (i32, i32, String) {
    let t = task
        .process_status
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("terminated");
    (t.exit_code, t.signal, t.reason.clone())
}

#[tokio::test]
async fn a_failing_task_is_reported_failed() {
    let executor = Executor::start(1);
    let client = executor.client();
    let tasks = vec![
        task("fails", &["sh", "-c", "echo about to fail; exit 1"]),
        task("succeeds", &["true"]),
    ];
    let accepted = client.set_tasks(LOCAL, &tasks).await.expect("setTasks");
    assert_eq!(accepted.len(), 2);

    let failed = wait_task(&client, LOCAL, "fails", "terminated", terminated).await;
    assert_eq!(exit_of(&failed), (1, 0, "Error".into()));
    assert_eq!(failed.phase(), TaskPhase::Failed);
    assert_eq!(executor.stdout("fails"), "about to fail\n");
    let succeeded = wait_task(&client, LOCAL, "succeeds", "terminated", terminated).await;
    assert_eq!(exit_of(&succeeded), (0, 0, "Completed".into()));
    assert_eq!(succeeded.phase(), TaskPhase::Succeeded);

    let still_listed = wait_task(&client, LOCAL, "succeeds", "listed", |_| true).await;
    assert!(
        still_listed.deletion_timestamp.is_none(),
        "finished tasks stay listed while desired"
    );
    client
        .set_tasks(LOCAL, &[task("nope", &["/no/such/binary"])])
        .await
        .expect("setTasks");
    let start_error = wait_task(&client, LOCAL, "nope", "terminated", terminated).await;
    assert_eq!(exit_of(&start_error), (127, 0, "StartError".into()));
    assert_eq!(start_error.phase(), TaskPhase::Failed);
}

#[tokio::test]
async fn a_timed_out_task_gets_sigterm_then_sigkill() {
    let grace = 2;
    let executor = Executor::start(grace);
    let client = executor.client();
    let stubborn = with_timeout(
        task(
            "stubborn",
            &[
                "sh",
                "-c",
                r#"trap 'echo TERM received' TERM; echo started; while :; do sleep 0.1; done"#,
            ],
        ),
        1,
    );
    let polite = with_timeout(task("polite", &["sleep", "30"]), 1);
    let started = Instant::now();
    client
        .set_tasks(LOCAL, &[stubborn, polite])
        .await
        .expect("setTasks");

    let polite = wait_task(&client, LOCAL, "polite", "terminated", terminated).await;
    assert_eq!(
        exit_of(&polite),
        (143, 15, "DeadlineExceeded".into()),
        "SIGTERM was enough"
    );
    assert_eq!(polite.phase(), TaskPhase::Failed);

    let stubborn = wait_task(&client, LOCAL, "stubborn", "terminated", terminated).await;
    let elapsed = started.elapsed();
    assert_eq!(
        exit_of(&stubborn),
        (137, 9, "DeadlineExceeded".into()),
        "it ignored SIGTERM, so SIGKILL"
    );
    assert_eq!(stubborn.phase(), TaskPhase::Failed);
    assert_eq!(
        executor.stdout("stubborn"),
        "started\nTERM received\n",
        "SIGTERM came first"
    );
    assert!(
        elapsed >= Duration::from_secs(1 + grace) - Duration::from_millis(200),
        "SIGKILL only after the {grace}s grace period (took {elapsed:?})"
    );
}

#[tokio::test]
async fn an_executor_restart_recovers_its_state() {
    let mut executor = Executor::start(1);
    let client = executor.client();
    let pid_file = executor.scratch().join("long.pid");
    let long_cmd = format!("echo $$ > {}; exec sleep 60", pid_file.display());
    let tasks = vec![
        task("done", &["echo", "hi"]),
        task("failed", &["sh", "-c", "exit 3"]),
        task("long", &["sh", "-c", &long_cmd]),
        // Finishes while the executor is down: its exit code must not be lost.
        task("during-downtime", &["sh", "-c", "sleep 2; exit 7"]),
    ];
    client.set_tasks(LOCAL, &tasks).await.expect("setTasks");
    wait_task(&client, LOCAL, "done", "terminated", terminated).await;
    wait_task(&client, LOCAL, "failed", "terminated", terminated).await;
    let long_before = wait_task(&client, LOCAL, "long", "running", |t| {
        t.phase() == TaskPhase::Running
    })
    .await;
    wait_task(&client, LOCAL, "during-downtime", "running", |t| {
        t.phase() == TaskPhase::Running
    })
    .await;
    let long_pid = read_pid(&pid_file).await;

    executor.crash();
    assert!(client.get_tasks(LOCAL).await.unwrap_err().is_unreachable());
    // The supervisor records the exit of the task that ends while no executor runs.
    let exit_record = executor
        .data_dir()
        .join("tasks")
        .join("during-downtime")
        .join("exit.json");
    let start = Instant::now();
    while !exit_record.exists() {
        assert!(start.elapsed() < T, "no exit record after {T:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(alive(long_pid), "tasks outlive the executor");
    executor.spawn();
    let client = executor.client();

    let tasks = client
        .get_tasks(LOCAL)
        .await
        .expect("getTasks after restart");
    let names: Vec<_> = tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["done", "failed", "long", "during-downtime"],
        "same list, same order"
    );
    assert_eq!(exit_of(&tasks[0]), (0, 0, "Completed".into()));
    assert_eq!(exit_of(&tasks[1]), (3, 0, "Error".into()));
    assert_eq!(
        tasks[2].phase(),
        TaskPhase::Running,
        "the running task was picked up again"
    );
    assert_eq!(
        tasks[2].process_status, long_before.process_status,
        "with its original start time"
    );
    let downtime = wait_task(&client, LOCAL, "during-downtime", "terminated", terminated).await;
    assert_eq!(
        exit_of(&downtime),
        (7, 0, "Error".into()),
        "exit code recorded while no executor ran"
    );

    // The resumed task is still under control: removing it stops it.
    let keep: Vec<Task> = tasks.iter().filter(|t| t.name != "long").cloned().collect();
    client.set_tasks(LOCAL, &keep).await.expect("setTasks");
    wait_gone(&client, "long").await;
    wait_dead(long_pid, "the resumed task").await;
}

#[tokio::test]
async fn requests_without_a_credential_for_this_pod_are_rejected() {
    let executor = Executor::start(1);
    let marker = executor.scratch().join("ran");
    let attempt = vec![task("sneaky", &["touch", marker.to_str().unwrap()])];

    let anonymous = ExecutorClient::new(None).with_port(executor.port());
    let other_key = ExecutorClient::new(Some(signing_key())).with_port(executor.port());
    let right_key = executor.client();
    let other_pod = PodRef {
        ip: LOCAL.ip,
        uid: "5f0c0d8e-another-pod",
    };
    for (client, pod) in [
        (&anonymous, LOCAL),
        (&other_key, LOCAL),
        (&right_key, other_pod),
    ] {
        let error = client.set_tasks(pod, &attempt).await.unwrap_err();
        assert!(
            matches!(error, ExecutorError::Unauthorized { .. }),
            "{error:?}"
        );
        let error = client.get_tasks(pod).await.unwrap_err();
        assert!(
            matches!(error, ExecutorError::Unauthorized { .. }),
            "{error:?}"
        );
        client
            .health(LOCAL.ip)
            .await
            .expect("/health needs no credential");
    }
    // Every other path is closed too, known or not, and a credential for one request does not
    // open another.
    let get = executor
        .key
        .authorization(LOCAL.uid, "GET", "/getTasks", b"", SystemTime::now());
    for request in [
        "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        format!(
            "POST /setTasks HTTP/1.1\r\nHost: x\r\nAuthorization: {get}\r\nContent-Length: 2\r\n\r\n[]"
        ),
        format!(
            "POST /setTasks HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 2\r\n\r\n[]",
            executor.authorization()
        ),
    ] {
        let response = raw_request(executor.port(), &request).await;
        assert!(
            response.starts_with("HTTP/1.1 401"),
            "{request:?}: {response}"
        );
    }
    // /health says that something answers, and nothing else.
    let health = raw_request(executor.port(), "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let body = health.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(body, r#"{"status":"healthy"}"#, "{health}");
    assert!(!health.contains(LOCAL.uid));

    // A request with the credential after the refused ones: once its task has run, anything the
    // refused requests had started would be listed before it and would have run too.
    let client = executor.client();
    client
        .set_tasks(LOCAL, &[task("allowed", &["true"])])
        .await
        .expect("setTasks with a credential for this pod");
    wait_task(&client, LOCAL, "allowed", "terminated", terminated).await;
    let names: Vec<_> = client
        .get_tasks(LOCAL)
        .await
        .expect("getTasks")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["allowed"]);
    assert!(!marker.exists(), "nothing ran");
}

/// The executor runs as root here (the tests do): its tasks run as nobody, and cannot read its
/// environment or a secret file of its.
#[tokio::test]
async fn tasks_run_as_another_user_and_cannot_read_the_executors_secrets() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let token = scratch.path().join("command-token");
    std::fs::write(&token, "command-api-secret").expect("token file");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o400))
        .expect("chmod 0400");
    let executor = Executor::start_with(1, &["--command-token-file", token.to_str().unwrap()]);
    let client = executor.client();
    let script = format!(
        r#"echo "$(id -u):$(id -g)"
cat /proc/{pid}/environ >/dev/null 2>&1 && echo environ-readable || echo environ-denied
cat /proc/{pid}/mem >/dev/null 2>&1 && echo mem-readable || echo mem-denied
cat {token} 2>/dev/null || echo token-denied
kill -0 {pid} 2>/dev/null && echo can-signal || echo cannot-signal"#,
        pid = executor.pid(),
        token = token.display()
    );
    client
        .set_tasks(LOCAL, &[task("probe", &["sh", "-c", &script])])
        .await
        .expect("setTasks");
    wait_task(&client, LOCAL, "probe", "terminated", terminated).await;
    assert_eq!(
        executor.stdout("probe"),
        "65534:65534\nenviron-denied\nmem-denied\ntoken-denied\ncannot-signal\n"
    );
}

#[tokio::test]
async fn secrets_in_the_environment_or_in_readable_files_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("command-token");
    std::fs::write(&token, "s3cret").expect("token file");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let run = |configure: &dyn Fn(&mut Command)| {
        let mut command = Command::new(crate::harness::workspace_bin("sandbox-task-executor"));
        command
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("EXECD_ACCESS_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().expect("spawning sandbox-task-executor");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let mut stderr = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).ok();
                return (status, stderr);
            }
            if start.elapsed() > T {
                let _ = child.kill();
                panic!("the executor started although it should have refused to");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (status, stderr) = run(&|c| {
        c.arg("--allow-unauthenticated")
            .env("EXECD_ACCESS_TOKEN", "s3cret");
    });
    assert!(!status.success());
    assert!(stderr.contains("--command-token-file"), "{stderr}");
    let (status, stderr) = run(&|c| {
        c.arg("--allow-unauthenticated")
            .arg("--command-token-file")
            .arg(&token);
    });
    assert!(!status.success());
    assert!(stderr.contains("0400"), "{stderr}");
    // Without a key and without --allow-unauthenticated, no task API.
    let (status, stderr) = run(&|_| {});
    assert!(!status.success());
    assert!(stderr.contains("no controller public key"), "{stderr}");
}

#[tokio::test]
async fn shell_metacharacters_are_passed_literally() {
    let executor = Executor::start(1);
    let client = executor.client();
    let pwned = executor.scratch().join("pwned");
    let args = [
        format!("; touch {}", pwned.display()),
        format!("$(touch {})", pwned.display()),
        format!("`touch {}`", pwned.display()),
        "$HOME".to_string(),
        "a  b".to_string(),
        "| cat /etc/passwd".to_string(),
    ];
    let mut echo = task("echo", &["echo"]);
    echo.process.as_mut().unwrap().args = args.to_vec();
    client.set_tasks(LOCAL, &[echo]).await.expect("setTasks");
    let done = wait_task(&client, LOCAL, "echo", "terminated", terminated).await;
    assert_eq!(exit_of(&done), (0, 0, "Completed".into()));
    assert_eq!(
        executor.stdout("echo"),
        format!("{}\n", args.join(" ")),
        "echoed verbatim"
    );
    assert!(!pwned.exists(), "no shell ever saw the arguments");
}

#[tokio::test]
async fn task_env_and_working_dir_are_set() {
    let executor = Executor::start(1);
    let client = executor.client();
    let mut probe = task(
        "env",
        &[
            "sh",
            "-c",
            r#"echo "$TASK_TYPE|${EXECD_ACCESS_TOKEN:-unset}|$(pwd)""#,
        ],
    );
    let process = probe.process.as_mut().unwrap();
    process.env = vec![EnvVar {
        name: "TASK_TYPE".into(),
        value: "logger".into(),
        value_from: None,
    }];
    process.working_dir = executor.scratch().display().to_string();
    client.set_tasks(LOCAL, &[probe]).await.expect("setTasks");
    wait_task(&client, LOCAL, "env", "terminated", terminated).await;
    assert_eq!(
        executor.stdout("env"),
        format!("logger|unset|{}\n", executor.scratch().display())
    );
}

#[tokio::test]
async fn removing_a_task_from_the_list_stops_it_and_its_children() {
    let executor = Executor::start(1);
    let client = executor.client();
    let script = |name: &str| {
        let dir = executor.scratch();
        // A loop like the spec's logger, with a child of its own.
        format!(
            "echo $$ > {d}/{name}.pid; sleep 60 & echo $! > {d}/{name}.child; while true; do date; sleep 1; done",
            d = dir.display()
        )
    };
    let (a, b) = (script("a"), script("b"));
    client
        .set_tasks(
            LOCAL,
            &[
                task("a", &["bash", "-c", &a]),
                task("b", &["bash", "-c", &b]),
            ],
        )
        .await
        .unwrap();
    let a_pid = read_pid(&executor.scratch().join("a.pid")).await;
    let a_child = read_pid(&executor.scratch().join("a.child")).await;
    let b_pid = read_pid(&executor.scratch().join("b.pid")).await;
    wait_task(&client, LOCAL, "a", "running", |t| {
        t.phase() == TaskPhase::Running
    })
    .await;

    let listed = client
        .set_tasks(LOCAL, &[task("b", &["bash", "-c", &b])])
        .await
        .unwrap();
    let a = listed
        .iter()
        .find(|t| t.name == "a")
        .expect("a is listed until it has stopped");
    assert!(a.deletion_timestamp.is_some());
    assert_eq!(
        a.phase(),
        TaskPhase::Running,
        "still counted as running while it stops"
    );
    wait_gone(&client, "a").await;
    wait_dead(a_pid, "the removed task").await;
    wait_dead(a_child, "the removed task's child").await;
    assert!(alive(b_pid), "the task that stays keeps running");

    client.set_tasks(LOCAL, &[]).await.unwrap();
    wait_gone(&client, "b").await;
    wait_dead(b_pid, "task b").await;
    assert!(client.get_tasks(LOCAL).await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_requests_are_refused_and_unreachable_executors_reported() {
    let mut executor = Executor::start(1);
    let client = executor.client();
    let error = client
        .set_tasks(LOCAL, &[task("../escape", &["true"])])
        .await
        .unwrap_err();
    assert!(
        matches!(error, ExecutorError::Status { status: 400, .. }),
        "{error:?}"
    );
    let error = client
        .set_tasks(LOCAL, &[task("a", &["true"]), task("a", &["true"])])
        .await
        .unwrap_err();
    assert!(
        matches!(error, ExecutorError::Status { status: 400, .. }),
        "{error:?}"
    );
    // An oversized body is refused from its headers alone. (A real client streaming 2 MiB may
    // see the connection close mid-write instead, so this talks HTTP by hand.)
    let response = raw_request(
        executor.port(),
        &format!(
            "POST /setTasks HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
            executor.authorization(),
            2 * 1024 * 1024
        ),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    let mut chunked = task("huge", &["echo"]);
    chunked.process.as_mut().unwrap().args = vec!["x".repeat(1024 * 1024 + 1024)];
    let body = serde_json::to_string(&[chunked]).unwrap();
    let response = raw_request(
        executor.port(),
        &format!(
            "POST /setTasks HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            executor.authorization(),
            body.len()
        ),
    )
    .await;
    assert!(
        response.starts_with("HTTP/1.1 413"),
        "a body without a length is capped too: {response}"
    );
    assert!(
        client.get_tasks(LOCAL).await.unwrap().is_empty(),
        "nothing was applied"
    );
    assert!(matches!(
        client
            .get_tasks(PodRef {
                ip: "not-an-ip",
                uid: LOCAL.uid
            })
            .await,
        Err(ExecutorError::InvalidAddress(_))
    ));

    executor.crash();
    let error = client.get_tasks(LOCAL).await.unwrap_err();
    assert!(error.is_unreachable(), "{error:?}");
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = ExecutorClient::new(None)
        .with_port(silent.local_addr().unwrap().port())
        .with_timeout(Duration::from_millis(300));
    let error = slow.get_tasks(LOCAL).await.unwrap_err();
    assert!(
        matches!(error, ExecutorError::Timeout { .. }),
        "an executor that never answers: {error:?}"
    );
}

/// Sends `request` as is and returns the start of the response.
async fn raw_request(port: u16, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // The server may answer (and close) before it has read everything; that is fine here.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = vec![0u8; 512];
    let n = tokio::time::timeout(T, stream.read(&mut response))
        .await
        .expect("a response")
        .unwrap_or(0);
    String::from_utf8_lossy(&response[..n]).into_owned()
}

#[tokio::test]
async fn a_stopped_task_leaves_the_list_only_once_its_setsid_child_is_gone() {
    let executor = Executor::start(1);
    let client = executor.client();
    let pid_file = executor.scratch().join("leftover");
    let script = format!(
        "setsid sleep 1000 & echo $! > {}; exec sleep 1000",
        pid_file.display()
    );
    client
        .set_tasks(LOCAL, &[task("a", &["sh", "-c", &script])])
        .await
        .unwrap();
    let leftover = read_pid(&pid_file).await;
    wait_task(&client, LOCAL, "a", "running", |t| {
        t.phase() == TaskPhase::Running
    })
    .await;
    // The controller's stop: an empty desired list, asked again until it comes back empty.
    let start = Instant::now();
    loop {
        let listed = client.set_tasks(LOCAL, &[]).await.unwrap();
        if listed.is_empty() {
            assert!(
                !alive(leftover),
                "the list was empty while the task's setsid sleep {leftover} still ran"
            );
            break;
        }
        for task in &listed {
            assert!(
                !task.all_processes_ended() || !alive(leftover),
                "confirmation given while {leftover} runs: {task:?}"
            );
        }
        assert!(start.elapsed() < T, "still listed: {listed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_task_whose_supervisor_was_killed_stays_listed_unconfirmed() {
    let executor = Executor::start(1);
    let client = executor.client();
    let pid_file = executor.scratch().join("pids");
    // The task's supervisor is killed (from outside: the task runs as another user and cannot
    // signal it): nothing can vouch for the task's processes any more.
    let script = format!(
        "setsid sleep 1000 & echo $! $$ $PPID > {0}.tmp && mv {0}.tmp {0}; exec sleep 1000",
        pid_file.display()
    );
    client
        .set_tasks(LOCAL, &[task("lost", &["sh", "-c", &script])])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pids: Vec<u32> = loop {
        if let Ok(text) = std::fs::read_to_string(&pid_file) {
            break text
                .split_whitespace()
                .map(|p| p.parse().expect("pid"))
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the task never wrote its pids"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _cleanup = scopeguard(pids[..2].to_vec());
    let supervisor = rustix::process::Pid::from_raw(pids[2] as i32).expect("supervisor pid");
    rustix::process::kill_process(supervisor, rustix::process::Signal::KILL)
        .expect("kill the supervisor");
    let lost = wait_task(&client, LOCAL, "lost", "terminated", terminated).await;
    assert_eq!(exit_of(&lost).2, "Lost");
    assert!(!lost.all_processes_ended(), "{lost:?}");
    let listed = client.set_tasks(LOCAL, &[]).await.unwrap();
    let still = listed
        .iter()
        .find(|t| t.name == "lost")
        .expect("an unconfirmed task is never dropped from the list");
    assert!(still.deletion_timestamp.is_some() && !still.all_processes_ended());
}

/// Kills `pids` when dropped.
fn scopeguard(pids: Vec<u32>) -> impl Drop {
    struct Kill(Vec<u32>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for pid in &self.0 {
                if let Some(pid) = rustix::process::Pid::from_raw(*pid as i32)
                    .filter(|p| p.as_raw_nonzero().get() > 1)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
    Kill(pids)
}
