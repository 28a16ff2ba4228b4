//! The local executor runner (`sandbox-controller local-executors`).
//!
//! kwok pods run no containers, so locally nothing would answer on a sandbox pod's ports. This
//! runner watches all pods and, for every Running pod that is a sandbox and has a loopback pod IP
//! (kwok hands out 127.1.x.y), runs the real `sandbox-task-executor` bound to that IP, with its
//! data in `<state dir>/executors/<namespace>/<pod>`:
//!
//! * a pod with a `task-executor` container gets the task API on `:5758` and the command API
//!   of OpenSandbox's execd on `:44772`, as the sidecar serves them in a cluster;
//! * a pod that would run OpenSandbox's execd (it has the `execd-installer` init container of
//!   OpenSandbox's server) gets the command API on `:44772` only.
//!
//! Each executor sees `<data>/opensandbox-bin` (holding `bootstrap.sh`) at `/opt/opensandbox`, in
//! a private mount namespace, where OpenSandbox's sandboxes find it in a pod.
//!
//! When the pod goes away, its executor stops its tasks and commands and exits, and the data goes
//! too, as a pod's `emptyDir` would. An executor that crashes is restarted (with backoff) and
//! resumes its tasks.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use sandbox_controller::controller::sidecar::has_executor;
use sandbox_executor::command::EXECD_INSTALLER;
use sandbox_executor::credential::{PublicKey, Seed, SigningKey, read_key_file};

/// How the runner starts executors.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Executors keep their data under `<state_dir>/executors/<namespace>/<pod>`.
    pub state_dir: PathBuf,
    /// The `sandbox-task-executor` binary.
    pub executor_bin: PathBuf,
    /// The controller's public key, passed to every executor as `--controller-public-key-file`
    /// (each also gets its pod's UID, so it accepts only requests signed for that pod).
    pub public_key_file: PathBuf,
    pub port: u16,
    /// The command API's port on each pod IP.
    pub command_port: u16,
    /// Passed to every executor as `--command-token-file`, if set.
    pub command_token_file: Option<PathBuf>,
    /// The executors' `--kill-grace-seconds`.
    pub kill_grace: Duration,
    /// Put first on the executors' `PATH` (see [`task_programs`]), if set.
    pub task_bin: Option<PathBuf>,
}

/// OpenSandbox's `bootstrap.sh` for sandboxes whose command API the executor serves; every
/// executor finds it at [`OPENSANDBOX_DIR`]`/bootstrap.sh`.
pub const BOOTSTRAP_SH: &str = include_str!("../../../deploy/opensandbox/bootstrap.sh");
/// Where OpenSandbox's sandboxes expect their tools.
pub const OPENSANDBOX_DIR: &str = "/opt/opensandbox";

/// Why the runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("watching pods: {0}")]
    Watch(#[from] watcher::Error),
    #[error("the pod watch ended")]
    WatchEnded,
    #[error("the executor signing key: {0}")]
    Key(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where an executor should run: the parts of a pod that decide it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub uid: String,
    pub ip: IpAddr,
    /// Serve the task API (the pod has a `task-executor` container), not only the command API.
    pub tasks: bool,
}

/// The executor a pod needs, if any: Running, not being deleted, a sandbox (a `task-executor`
/// container, or OpenSandbox's execd installer), on a loopback pod IP and not on the host network
/// (whose IP all such pods share).
pub fn placement(pod: &Pod) -> Option<Placement> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    let tasks = has_executor(spec);
    let execd = spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.name == EXECD_INSTALLER);
    if pod.metadata.deletion_timestamp.is_some()
        || status.phase.as_deref() != Some("Running")
        || spec.host_network == Some(true)
        || !(tasks || execd)
    {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    if !ip.is_loopback() {
        return None;
    }
    Some(Placement {
        uid: pod.metadata.uid.clone()?,
        ip,
        tasks,
    })
}

/// The public half of the signing key in `signing_key_file` (hex seed), written to
/// `public_key_file` for the executors. A missing signing key file is created with a fresh key,
/// mode 0400: only the controller reads it.
pub fn ensure_key_files(
    signing_key_file: &Path,
    public_key_file: &Path,
) -> Result<PublicKey, RunnerError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunnerError::Io { path, source }
    };
    if !signing_key_file.exists() {
        let seed = Seed::generate().map_err(|e| RunnerError::Key(e.to_string()))?;
        write_new_file(signing_key_file, seed.to_hex().as_bytes(), 0o400)
            .map_err(io(signing_key_file))?;
        info!(path = %signing_key_file.display(), "created a new executor signing key");
    }
    let seed: Seed =
        read_key_file(signing_key_file).map_err(|e| RunnerError::Key(e.to_string()))?;
    let public = SigningKey::from_seed(&seed)
        .map_err(|e| RunnerError::Key(e.to_string()))?
        .public_key();
    write_new_file(public_key_file, public.to_string().as_bytes(), 0o444)
        .map_err(io(public_key_file))?;
    Ok(public)
}

/// The programs a sandbox image would have on its `PATH`, for tasks that run as another user.
///
/// kwok pods have no image: their tasks run on this machine, as an unprivileged user, and find
/// programs through the executor's `PATH`. Where the machine's only `python` is in a directory
/// that user cannot enter (a pyenv under `/root`, say), links in `dir` lead `python` and
/// `python3` to a `python3` it can run. Returns `dir`, to be put first on the executors' `PATH`.
pub fn task_programs(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let open_to_all = |file: &Path| {
        file.ancestors()
            .skip(1)
            .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
            && std::fs::metadata(file).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    };
    let python = std::env::split_paths(&path)
        .map(|d| d.join("python3"))
        .find(|p| p.is_absolute() && open_to_all(p));
    for name in ["python", "python3"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        if let Some(target) = &python {
            std::os::unix::fs::symlink(target, &link)?;
        }
    }
    Ok(dir.to_path_buf())
}

/// Writes `path` whole (temp file, fsync, rename) with `mode`.
fn write_new_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(content)?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)
}

struct Running {
    placement: Placement,
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    No,
    /// The runner is exiting: stop the executor, keep its data.
    Keep,
    /// The pod is gone: stop the executor and remove its data.
    Wipe,
}

/// Runs executors for pods until `shutdown` resolves; then stops them all and returns.
pub async fn run(
    client: Client,
    config: RunnerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunnerError> {
    let pods: Api<Pod> = Api::all(client);
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut executors = Executors::default();
    let mut listed: Option<HashSet<(String, String)>> = None;
    tokio::pin!(shutdown);
    let result = loop {
        let event = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            event = events.try_next() => event,
        };
        let event = match event {
            Ok(Some(event)) => event,
            Ok(None) => break Err(RunnerError::WatchEnded),
            Err(error) => {
                // default_backoff() retries; this only reports the hiccup.
                warn!(%error, "pod watch error; retrying");
                continue;
            }
        };
        match event {
            watcher::Event::Init => listed = Some(HashSet::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(listed) = listed.as_mut() {
                    listed.insert(key(&pod));
                }
                executors.reconcile(&config, &pod);
            }
            watcher::Event::InitDone => {
                // Pods deleted while the watch was down were never reported as deleted.
                let listed = listed.take().unwrap_or_default();
                let gone: Vec<_> = executors
                    .running
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    executors.stop(&key, Stop::Wipe);
                }
            }
            watcher::Event::Apply(pod) => executors.reconcile(&config, &pod),
            watcher::Event::Delete(pod) => executors.stop(&key(&pod), Stop::Wipe),
        }
    };
    info!(
        executors = executors.running.len(),
        "stopping all executors"
    );
    let mut tasks: Vec<_> = executors
        .running
        .into_values()
        .map(|r| {
            let _ = r.stop.send(Stop::Keep);
            r.task
        })
        .collect();
    tasks.extend(executors.draining.into_values());
    futures::future::join_all(tasks).await;
    result
}

type PodKey = (String, String);

#[derive(Default)]
struct Executors {
    running: HashMap<PodKey, Running>,
    /// Supervisors told to stop and not finished yet. The next executor of the same pod name
    /// waits for its predecessor, so two never share (or wipe) one data directory.
    draining: HashMap<PodKey, JoinHandle<()>>,
}

fn key(pod: &Pod) -> PodKey {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

impl Executors {
    fn reconcile(&mut self, config: &RunnerConfig, pod: &Pod) {
        self.draining.retain(|_, task| !task.is_finished());
        let key = key(pod);
        let wanted = placement(pod);
        if let Some(current) = self.running.get(&key) {
            if Some(&current.placement) == wanted.as_ref() {
                return;
            }
            let same_pod = wanted
                .as_ref()
                .is_some_and(|w| w.uid == current.placement.uid);
            self.stop(&key, if same_pod { Stop::Keep } else { Stop::Wipe });
        }
        let Some(placement) = wanted else {
            return;
        };
        let data_dir = config.state_dir.join("executors").join(&key.0).join(&key.1);
        let (stop_tx, stop_rx) = watch::channel(Stop::No);
        let predecessor = self.draining.remove(&key);
        let name = format!("{}/{}", key.0, key.1);
        let (config, for_task) = (config.clone(), placement.clone());
        let task = tokio::spawn(async move {
            if let Some(predecessor) = predecessor {
                let _ = predecessor.await;
            }
            supervise(name, for_task, data_dir, config, stop_rx).await
        });
        self.running.insert(
            key,
            Running {
                placement,
                stop: stop_tx,
                task,
            },
        );
    }

    fn stop(&mut self, key: &PodKey, mode: Stop) {
        if let Some(entry) = self.running.remove(key) {
            let _ = entry.stop.send(mode);
            self.draining.insert(key.clone(), entry.task);
        }
    }
}

/// Keeps one executor running until told to stop.
async fn supervise(
    name: String,
    placement: Placement,
    data_dir: PathBuf,
    config: RunnerConfig,
    mut stop: watch::Receiver<Stop>,
) {
    let volume = data_dir.join("opensandbox-bin");
    if let Err(error) =
        prepare_data_dir(&data_dir, &placement.uid).and_then(|()| write_bootstrap(&volume))
    {
        error!(pod = %name, %error, "cannot prepare the executor's data directory");
        return;
    }
    let listen = SocketAddr::new(placement.ip, config.port);
    let command_listen = SocketAddr::new(placement.ip, config.command_port);
    let mut backoff = Duration::from_millis(500);
    let mode = loop {
        let mut command = tokio::process::Command::new(&config.executor_bin);
        if placement.tasks {
            command
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--controller-public-key-file")
                .arg(&config.public_key_file)
                .arg("--pod-uid")
                .arg(&placement.uid);
        } else {
            command.args(["--listen", "none"]);
        }
        if let Some(token) = &config.command_token_file {
            command.arg("--command-token-file").arg(token);
        }
        if let Some(bin) = &config.task_bin {
            let mut path = vec![bin.clone()];
            path.extend(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            ));
            if let Ok(path) = std::env::join_paths(path) {
                command.env("PATH", path);
            }
        }
        let spawned = command
            .arg("--command-listen")
            .arg(command_listen.to_string())
            .arg("--mount")
            .arg(format!("{}:{OPENSANDBOX_DIR}", volume.display()))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--kill-grace-seconds")
            .arg(config.kill_grace.as_secs().to_string())
            .arg("--stop-tasks-on-exit")
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            // Tasks inherit the executor's environment: no cluster credentials in it.
            .env_remove(sandbox_executor::command::ACCESS_TOKEN_ENV)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(mut child) => {
                info!(pod = %name, tasks = placement.tasks.then_some(listen).map(|a| a.to_string()), commands = %command_listen, pid = child.id().unwrap_or_default(), "started executor");
                if let Some(stderr) = child.stderr.take() {
                    tokio::spawn(prefix_lines(name.clone(), stderr));
                }
                tokio::select! {
                    status = child.wait() => {
                        warn!(pod = %name, ?status, retry_in = ?backoff, "executor exited; restarting it");
                    }
                    mode = wait_for_stop(&mut stop) => {
                        terminate(&name, &mut child, config.kill_grace).await;
                        break mode;
                    }
                }
            }
            Err(error) => {
                error!(pod = %name, %error, bin = %config.executor_bin.display(), "cannot start the executor");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(Duration::from_secs(30)),
            mode = wait_for_stop(&mut stop) => break mode,
        }
    };
    if mode == Stop::Wipe
        && let Err(error) = std::fs::remove_dir_all(&data_dir)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        warn!(pod = %name, %error, "cannot remove the executor's data directory");
    }
    info!(pod = %name, "executor stopped");
}

async fn wait_for_stop(stop: &mut watch::Receiver<Stop>) -> Stop {
    loop {
        let mode = *stop.borrow_and_update();
        if mode != Stop::No {
            return mode;
        }
        if stop.changed().await.is_err() {
            // The runner dropped us without a word: treat as its exit.
            return Stop::Keep;
        }
    }
}

/// SIGTERM, which makes the executor stop its tasks (SIGTERM, then SIGKILL after `grace`) and
/// exit; SIGKILL if it is still there well after that.
async fn terminate(name: &str, child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, Signal::TERM);
    }
    let patience = grace + Duration::from_secs(15);
    if tokio::time::timeout(patience, child.wait()).await.is_err() {
        warn!(pod = %name, ?patience, "executor did not exit after SIGTERM; killing it");
        let _ = child.kill().await;
    }
}

/// A pod's data directory, emptied when it belonged to an earlier pod of the same name.
fn prepare_data_dir(dir: &Path, uid: &str) -> std::io::Result<()> {
    let marker = dir.join("pod-uid");
    match std::fs::read_to_string(&marker) {
        Ok(previous) if previous.trim() == uid => return Ok(()),
        Ok(_) => std::fs::remove_dir_all(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(marker, uid)
}

/// The pod's `/opt/opensandbox` volume: `bootstrap.sh`, executable.
fn write_bootstrap(volume: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(volume)?;
    let path = volume.join("bootstrap.sh");
    std::fs::write(&path, BOOTSTRAP_SH)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
}

/// Copies an executor's log lines to ours, each prefixed with its pod.
async fn prefix_lines(name: String, stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    let mut out = tokio::io::stderr();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = out.write_all(format!("[{name}] {line}\n").as_bytes()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};

    fn pod(ip: &str, phase: &str, containers: &[&str]) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: containers
                    .iter()
                    .map(|n| Container {
                        name: n.to_string(),
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: Some(ip.into()),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn only_running_loopback_pods_with_an_executor_get_one() {
        let ok = pod("127.1.0.5", "Running", &["app", "task-executor"]);
        assert_eq!(
            placement(&ok),
            Some(Placement {
                uid: "u1".into(),
                ip: "127.1.0.5".parse().unwrap(),
                tasks: true,
            })
        );
        assert_eq!(
            placement(&pod("127.1.0.5", "Pending", &["task-executor"])),
            None
        );
        assert_eq!(
            placement(&pod("10.0.0.5", "Running", &["task-executor"])),
            None,
            "never off loopback"
        );
        assert_eq!(placement(&pod("127.1.0.5", "Running", &["app"])), None);
        assert_eq!(placement(&pod("", "Running", &["task-executor"])), None);
        let mut deleting = ok.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_eq!(placement(&deleting), None);
        let mut host = ok.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(placement(&host), None);
    }

    #[test]
    fn pods_of_opensandbox_server_get_the_command_api_only() {
        let mut sandbox = pod("127.1.0.6", "Running", &["sandbox"]);
        sandbox.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: EXECD_INSTALLER.into(),
            ..Container::default()
        }]);
        assert_eq!(
            placement(&sandbox),
            Some(Placement {
                uid: "u1".into(),
                ip: "127.1.0.6".parse().unwrap(),
                tasks: false,
            })
        );
    }

    #[test]
    fn the_bootstrap_volume_holds_an_executable_script() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("opensandbox-bin");
        write_bootstrap(&volume).unwrap();
        let script = volume.join("bootstrap.sh");
        assert_eq!(std::fs::read_to_string(&script).unwrap(), BOOTSTRAP_SH);
        assert_eq!(
            std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn data_of_an_earlier_pod_with_the_same_name_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ns/p");
        prepare_data_dir(&dir, "u1").unwrap();
        std::fs::write(dir.join("tasks.json"), "{}").unwrap();
        prepare_data_dir(&dir, "u1").unwrap();
        assert!(dir.join("tasks.json").exists(), "same pod: state kept");
        prepare_data_dir(&dir, "u2").unwrap();
        assert!(!dir.join("tasks.json").exists(), "new pod: state dropped");
        assert_eq!(std::fs::read_to_string(dir.join("pod-uid")).unwrap(), "u2");
    }

    #[test]
    fn a_signing_key_is_created_once_private_and_only_its_public_half_shared() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (private, public) = (
            tmp.path().join("dev/executor-signing-key"),
            tmp.path().join("dev/executor-public-key"),
        );
        let key = ensure_key_files(&private, &public).unwrap();
        let seed = std::fs::read_to_string(&private).unwrap();
        assert_eq!(seed.len(), 64);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&private), 0o400);
        assert_eq!(mode(&public), 0o444);
        assert_eq!(std::fs::read_to_string(&public).unwrap(), key.to_string());
        assert_ne!(key.to_string(), seed);
        assert_eq!(ensure_key_files(&private, &public).unwrap(), key);
        assert_eq!(
            std::fs::read_to_string(&private).unwrap(),
            seed,
            "an existing key is kept"
        );
    }
}
