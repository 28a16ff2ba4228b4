//! The executor's task list: applying a desired list, watching each task's supervisor, and
//! picking the tasks up again after a restart.
//!
//! Each task runs under its own supervisor process ([`super::shim`]); a small monitor per task
//! watches the supervisor's files and lock and keeps the reported status current. The list
//! itself (names, processes, which are being deleted) is persisted on every change, so a new
//! executor process rebuilds everything from the data directory.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use rustix::process::{Pid, Signal};
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use super::command::ACCESS_TOKEN_ENV;
use super::identity::TaskIdentity;
use super::store::{DataDir, StartRecord, StoreError, StoredTask, Supervisor, TaskDir};
use super::wire::{
    InvalidTask, ProcessStatus, REASON_LOST, REASON_START_ERROR, Running, Task, Terminated,
    Waiting, validate_tasks,
};

/// How the manager runs tasks.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// The executable that provides the `shim` subcommand (the executor binary itself).
    pub shim_exe: PathBuf,
    /// Time between SIGTERM and SIGKILL, at a timeout and when a task is stopped.
    pub grace: Duration,
    /// Most tasks held at once, to bound the processes one request can start.
    pub max_tasks: usize,
    /// How often each monitor looks at its supervisor.
    pub poll: Duration,
    /// The user tasks run as (`None`: the executor's own).
    pub task_identity: Option<TaskIdentity>,
}

impl ManagerConfig {
    pub fn new(shim_exe: PathBuf) -> Self {
        ManagerConfig {
            shim_exe,
            grace: Duration::from_secs(10),
            max_tasks: 64,
            poll: Duration::from_millis(100),
            task_identity: None,
        }
    }
}

/// Why a desired list was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SetTasksError {
    #[error(transparent)]
    Invalid(#[from] InvalidTask),
    #[error("too many tasks: {requested} requested, at most {max} are held at once")]
    TooMany { requested: usize, max: usize },
    #[error("persisting the task list: {0}")]
    Store(#[from] StoreError),
}

struct Entry {
    /// Tells a recycled name apart from the task a monitor was started for.
    id: u64,
    stored: StoredTask,
    status: ProcessStatus,
    /// Stop the process (deletion, or the executor shutting down with its tasks).
    stop_wanted: bool,
    wake: Arc<Notify>,
}

impl Entry {
    fn terminated(&self) -> bool {
        self.status.terminated.is_some()
    }

    /// Terminated with every process of the task confirmed ended: only such a task may leave
    /// the list. One whose processes may live on stays listed, so whoever asks sees it.
    fn settled(&self) -> bool {
        self.status
            .terminated
            .as_ref()
            .is_some_and(|t| t.all_processes_ended)
    }

    fn to_wire(&self) -> Task {
        Task {
            name: self.stored.name.clone(),
            deletion_timestamp: self.stored.deletion_timestamp.clone(),
            process: Some(self.stored.process.clone()),
            pod_template_spec: None,
            process_status: Some(self.status.clone()),
        }
    }
}

/// The task list of one executor.
pub struct TaskManager {
    data: DataDir,
    config: ManagerConfig,
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
}

impl TaskManager {
    /// Opens the data directory and resumes what it records: finished tasks keep their result,
    /// tasks whose supervisor still runs are watched again, tasks whose supervisor vanished
    /// without a result are reported [`REASON_LOST`], and tasks that never started are started.
    pub async fn recover(data: DataDir, config: ManagerConfig) -> Result<Arc<Self>, StoreError> {
        let stored = data.load_tasks()?;
        let manager = Arc::new(TaskManager {
            data,
            config,
            entries: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let mut to_start = Vec::new();
        let mut to_watch = Vec::new();
        {
            let mut entries = manager.entries.lock().await;
            for task in stored {
                let dir = manager.data.task_dir(&task.name);
                let deleting = task.deletion_timestamp.is_some();
                let status = match dir.read_exit()? {
                    Some(terminated) => Some(terminated),
                    None if dir.supervisor()? == Supervisor::Alive => None,
                    None => match dir.read_started()? {
                        Some(started) => {
                            let lost = lost(Some(started.started_at));
                            dir.write_exit(&lost)?;
                            Some(lost)
                        }
                        None if deleting => {
                            dir.remove()?;
                            continue;
                        }
                        None => {
                            let entry = manager.new_entry(task, waiting("Starting"));
                            to_start.push((entry.id, entry.stored.clone()));
                            entries.push(entry);
                            continue;
                        }
                    },
                };
                match status {
                    Some(terminated) if deleting && terminated.all_processes_ended => {
                        dir.remove()?
                    }
                    Some(terminated) => {
                        let status = ProcessStatus {
                            terminated: Some(terminated),
                            ..ProcessStatus::default()
                        };
                        entries.push(manager.new_entry(task, status));
                    }
                    None => {
                        let status = match dir.read_started()? {
                            Some(started) => running(started.started_at),
                            None => waiting("Starting"),
                        };
                        let mut entry = manager.new_entry(task, status);
                        entry.stop_wanted = deleting;
                        to_watch.push((entry.id, entry.stored.name.clone()));
                        entries.push(entry);
                    }
                }
            }
            manager.persist(&entries)?;
            info!(
                tasks = entries.len(),
                resumed = to_watch.len(),
                "recovered the task list"
            );
        }
        for (id, name) in to_watch {
            tokio::spawn(manager.clone().monitor(id, name, None));
        }
        for (id, task) in to_start {
            manager.clone().start(id, task);
        }
        Ok(manager)
    }

    /// The current list with each task's status, in the order the tasks were first set.
    pub async fn list(&self) -> Vec<Task> {
        self.entries
            .lock()
            .await
            .iter()
            .map(Entry::to_wire)
            .collect()
    }

    /// Makes `desired` the task list: new names start, known names are left as they are, and
    /// tasks missing from `desired` are stopped and dropped once terminated with all their
    /// processes confirmed ended (never otherwise). Returns the list.
    pub async fn set_tasks(
        self: &Arc<Self>,
        desired: Vec<Task>,
    ) -> Result<Vec<Task>, SetTasksError> {
        validate_tasks(&desired)?;
        let mut entries = self.entries.lock().await;
        let wanted: HashSet<&str> = desired.iter().map(|t| t.name.as_str()).collect();
        let known: HashSet<String> = entries.iter().map(|e| e.stored.name.clone()).collect();
        let new: Vec<Task> = desired
            .iter()
            .filter(|t| !known.contains(&t.name))
            .cloned()
            .collect();
        let kept = entries
            .iter()
            .filter(|e| wanted.contains(e.stored.name.as_str()) || !e.settled())
            .count();
        if kept + new.len() > self.config.max_tasks {
            return Err(SetTasksError::TooMany {
                requested: kept + new.len(),
                max: self.config.max_tasks,
            });
        }

        // Decide, persist, then act: a crash in between leaves a list the next start resumes.
        let now = Time(Timestamp::now());
        let mut removed = Vec::new();
        entries.retain(|entry| {
            let drop = !wanted.contains(entry.stored.name.as_str()) && entry.settled();
            if drop {
                removed.push(entry.stored.name.clone());
            }
            !drop
        });
        let mut stopping = Vec::new();
        for entry in entries.iter_mut() {
            if !wanted.contains(entry.stored.name.as_str())
                && entry.stored.deletion_timestamp.is_none()
            {
                entry.stored.deletion_timestamp = Some(now.clone());
                entry.stop_wanted = true;
                stopping.push(entry.wake.clone());
            }
        }
        let mut to_start = Vec::new();
        for task in new {
            let process = task.process.unwrap_or_default();
            let stored = StoredTask {
                name: task.name,
                process,
                deletion_timestamp: None,
            };
            let entry = self.new_entry(stored, waiting("Starting"));
            to_start.push((entry.id, entry.stored.clone()));
            entries.push(entry);
        }
        self.persist(&entries)?;

        for name in &removed {
            info!(task = %name, "removed finished task");
            if let Err(error) = self.data.task_dir(name).remove() {
                warn!(%error, "could not remove a finished task's files");
            }
        }
        for wake in stopping {
            wake.notify_one();
        }
        for (id, stored) in to_start {
            self.clone().start(id, stored);
        }
        Ok(entries.iter().map(Entry::to_wire).collect())
    }

    /// Stops every task (as on deletion, without dropping them from the list) and waits up to
    /// `timeout` for all of them to terminate. Returns how many still run.
    pub async fn stop_all(&self, timeout: Duration) -> usize {
        {
            let mut entries = self.entries.lock().await;
            for entry in entries.iter_mut().filter(|e| !e.terminated()) {
                entry.stop_wanted = true;
                entry.wake.notify_one();
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let running = self
                .entries
                .lock()
                .await
                .iter()
                .filter(|e| !e.terminated())
                .count();
            if running == 0 || tokio::time::Instant::now() >= deadline {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn new_entry(&self, stored: StoredTask, status: ProcessStatus) -> Entry {
        Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            stop_wanted: stored.deletion_timestamp.is_some(),
            stored,
            status,
            wake: Arc::new(Notify::new()),
        }
    }

    fn persist(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let stored: Vec<StoredTask> = entries.iter().map(|e| e.stored.clone()).collect();
        self.data.save_tasks(&stored)
    }

    /// Starts the task's supervisor and its monitor.
    fn start(self: Arc<Self>, id: u64, task: StoredTask) {
        let dir = self.data.task_dir(&task.name);
        // Old files of an earlier task with this name must not be mistaken for this one's.
        if let Err(error) = dir.recreate() {
            return self.fail_to_start(
                id,
                dir,
                format!("cannot prepare the task's directory: {error}"),
            );
        }
        let process = &task.process;
        let mut command = tokio::process::Command::new(&self.config.shim_exe);
        command.arg("shim").arg("--task-dir").arg(dir.path());
        command
            .arg("--grace-ms")
            .arg(self.config.grace.as_millis().to_string());
        if let Some(timeout) = process.timeout_seconds {
            command.arg("--timeout-seconds").arg(timeout.to_string());
        }
        if !process.working_dir.is_empty() {
            command.arg("--working-dir").arg(&process.working_dir);
        }
        if let Some(identity) = self.config.task_identity {
            command.arg("--run-as").arg(identity.to_string());
        }
        command.arg("--").args(&process.command).args(&process.args);
        // The executor's secrets are not the task's.
        command.env_remove(ACCESS_TOKEN_ENV);
        command.envs(process.env.iter().map(|v| (&v.name, &v.value)));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // Its own process group: a Ctrl-C or group signal aimed at the executor leaves tasks alone.
        command.process_group(0).kill_on_drop(false);
        match command.spawn() {
            Ok(child) => {
                info!(task = %task.name, supervisor = child.id().unwrap_or_default(), "started task");
                tokio::spawn(self.monitor(id, task.name, Some(child)));
            }
            Err(error) => {
                let message = format!(
                    "cannot start the task supervisor {}: {error}",
                    self.config.shim_exe.display()
                );
                self.fail_to_start(id, dir, message);
            }
        }
    }

    fn fail_to_start(self: Arc<Self>, id: u64, dir: TaskDir, message: String) {
        warn!(%message, "task failed to start");
        let terminated = Terminated {
            exit_code: 128,
            reason: REASON_START_ERROR.into(),
            message,
            finished_at: Some(Time(Timestamp::now())),
            // The supervisor never ran, so the task started nothing.
            all_processes_ended: true,
            ..Terminated::default()
        };
        tokio::spawn(async move {
            let _ = dir.write_exit(&terminated);
            self.finish(id, terminated).await;
        });
    }

    /// Follows one task until it terminates. `child` is the supervisor when this executor
    /// started it; after a restart the supervisor is someone else's child and only its lock and
    /// files tell how it is doing.
    async fn monitor(
        self: Arc<Self>,
        id: u64,
        name: String,
        mut child: Option<tokio::process::Child>,
    ) {
        let dir = self.data.task_dir(&name);
        let Some(wake) = self
            .entries
            .lock()
            .await
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.wake.clone())
        else {
            return;
        };
        let mut stop_sent = false;
        let mut started = None;
        loop {
            match Self::observe(&dir, child.as_mut(), &mut started) {
                Ok(Observed::Terminated(terminated)) => {
                    if let Some(child) = child.as_mut() {
                        // The supervisor exits right after recording the result; reap it.
                        let _ = child.wait().await;
                    }
                    self.finish(id, terminated).await;
                    return;
                }
                Ok(Observed::Running(started)) => {
                    let stop_wanted = self.update(id, |entry| {
                        if entry.status.running.is_none() {
                            entry.status = running(started.started_at.clone());
                        }
                        entry.stop_wanted
                    });
                    match stop_wanted.await {
                        None => return,
                        Some(true) if !stop_sent => {
                            stop_sent = true;
                            info!(task = %name, "stopping task");
                            send_signal(started.supervisor_pid, Signal::TERM);
                        }
                        Some(_) => {}
                    }
                }
                Ok(Observed::Starting) => {}
                Err(error) => warn!(task = %name, %error, "cannot read the task's state; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.poll) => {}
                _ = wake.notified() => {}
            }
        }
    }

    /// Looks at the supervisor's files and liveness. `started` caches the start record, which
    /// never changes once written.
    fn observe(
        dir: &TaskDir,
        child: Option<&mut tokio::process::Child>,
        started: &mut Option<StartRecord>,
    ) -> Result<Observed, StoreError> {
        if let Some(terminated) = dir.read_exit()? {
            return Ok(Observed::Terminated(terminated));
        }
        if started.is_none() {
            *started = dir.read_started()?;
        }
        let started = started.clone();
        let alive = match child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => dir.supervisor()? == Supervisor::Alive,
        };
        if !alive {
            // It may have written its result just before exiting.
            if let Some(terminated) = dir.read_exit()? {
                return Ok(Observed::Terminated(terminated));
            }
            let lost = lost(started.map(|s| s.started_at));
            dir.write_exit(&lost)?;
            return Ok(Observed::Terminated(lost));
        }
        Ok(match started {
            Some(started) => Observed::Running(started),
            None => Observed::Starting,
        })
    }

    /// Applies `f` to the entry `id`; `None` if it is gone.
    async fn update<T>(&self, id: u64, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        self.entries
            .lock()
            .await
            .iter_mut()
            .find(|e| e.id == id)
            .map(f)
    }

    /// Records the final state; a task being deleted leaves the list with its files, once all
    /// its processes are confirmed ended.
    async fn finish(&self, id: u64, terminated: Terminated) {
        let mut entries = self.entries.lock().await;
        let Some(index) = entries.iter().position(|e| e.id == id) else {
            return;
        };
        let entry = &mut entries[index];
        info!(
            task = %entry.stored.name,
            exit_code = terminated.exit_code,
            reason = %terminated.reason,
            detail = %terminated.message,
            "task terminated"
        );
        entry.status = ProcessStatus {
            terminated: Some(terminated),
            ..ProcessStatus::default()
        };
        if entry.stored.deletion_timestamp.is_some() && entry.settled() {
            let name = entry.stored.name.clone();
            entries.remove(index);
            if let Err(error) = self.persist(&entries) {
                warn!(%error, "could not persist the task list");
            }
            if let Err(error) = self.data.task_dir(&name).remove() {
                warn!(%error, "could not remove a deleted task's files");
            }
        }
    }
}

enum Observed {
    Starting,
    Running(StartRecord),
    Terminated(Terminated),
}

fn waiting(reason: &str) -> ProcessStatus {
    ProcessStatus {
        waiting: Some(Waiting {
            reason: reason.into(),
            message: String::new(),
        }),
        ..ProcessStatus::default()
    }
}

fn running(started_at: Time) -> ProcessStatus {
    ProcessStatus {
        running: Some(Running {
            started_at: Some(started_at),
        }),
        ..ProcessStatus::default()
    }
}

/// The result of a task whose supervisor ended without recording one.
fn lost(started_at: Option<Time>) -> Terminated {
    Terminated {
        exit_code: 255,
        reason: REASON_LOST.into(),
        message: "the task's supervisor ended without recording a result (killed?); outcome \
                  unknown, and processes the task started may still run"
            .into(),
        started_at,
        finished_at: Some(Time(Timestamp::now())),
        ..Terminated::default()
    }
}

/// Signals one process; never pid 0 or 1, which `kill` would widen to a group or everyone.
fn send_signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}
