//! The per-task supervisor (`sandbox-task-executor shim`).
//!
//! The executor starts one supervisor per task instead of the task's process itself, so a task
//! outlives a restart of the executor with nothing lost: the supervisor holds the task's lock,
//! enforces `timeoutSeconds`, waits for the process and records its exit in `exit.json`, all
//! whether or not the executor is there to see it. The executor stops a task by sending its
//! supervisor SIGTERM.
//!
//! The process is started directly (no shell) as the leader of a new process group, and a stop
//! or timeout signals that whole group, so a `bash -c` loop and the `sleep` it is waiting on stop
//! together. Whatever the task leaves behind, in its group or not (`cmd &`, `setsid`, double
//! forks), is ended when the task ends for any reason: the supervisor is the task's child
//! subreaper ([`super::reaper`]), ends and reaps every descendant, and records the task's result
//! only afterwards, with `allProcessesEnded` telling whether none is left.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep_until};

use super::reaper;
use super::store::{StartRecord, StoreError, TaskDir};
use super::wire::{
    REASON_COMPLETED, REASON_DEADLINE_EXCEEDED, REASON_ERROR, REASON_START_ERROR, REASON_STOPPED,
    Terminated,
};

/// What the supervisor is told on its command line.
#[derive(Clone, Debug)]
pub struct ShimConfig {
    pub task_dir: PathBuf,
    pub working_dir: Option<PathBuf>,
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// The executable and all its arguments.
    pub argv: Vec<OsString>,
    /// The user the process runs as (`None`: the supervisor's own). The supervisor keeps its
    /// identity, so it can always signal and wait for the process.
    pub run_as: Option<super::identity::TaskIdentity>,
}

/// Why the supervisor could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another supervisor holds the lock of {0}")]
    Locked(PathBuf),
    #[error("installing the SIGTERM handler: {0}")]
    Signal(io::Error),
    #[error("waiting for the process: {0}")]
    Wait(io::Error),
    #[error("no command given")]
    NoCommand,
    #[error("becoming the task's child subreaper: {0}")]
    Subreaper(io::Error),
}

/// Why the supervisor signalled the process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopCause {
    Deadline,
    Requested,
}

/// Runs the task to completion and records the outcome. Meant to be the whole life of the
/// supervisor process.
pub async fn run(config: ShimConfig) -> Result<(), ShimError> {
    let dir = TaskDir::at(&config.task_dir);
    // The lock is the executor's proof of life for this task; take it before anything else.
    let _lock = take_lock(&dir).await?;
    // Before the task starts: orphans it leaves behind must come to us, not to init.
    reaper::become_subreaper().map_err(ShimError::Subreaper)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(ShimError::Signal)?;

    let (program, args) = config.argv.split_first().ok_or(ShimError::NoCommand)?;
    let started_at = Timestamp::now();
    let mut child = match spawn(&dir, &config, program, args) {
        Ok(child) => child,
        Err(error) => {
            let exit_code = match error.kind() {
                io::ErrorKind::NotFound => 127,
                io::ErrorKind::PermissionDenied => 126,
                _ => 128,
            };
            let message = format!("cannot start {}: {error}", program.to_string_lossy());
            dir.write_exit(&Terminated {
                exit_code,
                reason: REASON_START_ERROR.into(),
                message,
                started_at: None,
                finished_at: Some(Time(Timestamp::now())),
                // Nothing was started, so nothing can be left.
                all_processes_ended: true,
                ..Terminated::default()
            })?;
            return Ok(());
        }
    };
    let pid = child.id().unwrap_or_default();
    dir.write_started(&StartRecord {
        supervisor_pid: std::process::id(),
        pid,
        started_at: Time(started_at),
    })?;

    let far_future = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    let deadline = config.timeout.map_or(far_future, |t| Instant::now() + t);
    let mut kill_at = far_future;
    let mut cause: Option<StopCause> = None;
    let status: ExitStatus = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(ShimError::Wait)?,
            _ = sleep_until(deadline), if cause.is_none() => {
                cause = Some(StopCause::Deadline);
                signal_group(pid, Signal::TERM);
                kill_at = Instant::now() + config.grace;
            }
            _ = sigterm.recv(), if cause.is_none() => {
                cause = Some(StopCause::Requested);
                signal_group(pid, Signal::TERM);
                kill_at = Instant::now() + config.grace;
            }
            _ = sleep_until(kill_at), if cause.is_some() => {
                signal_group(pid, Signal::KILL);
                kill_at = far_future;
            }
        }
    };
    if cause.is_some() {
        // Whatever the leader left behind in its group goes with it.
        signal_group(pid, Signal::KILL);
    }
    let mut terminated = outcome(status, cause, &config, started_at);
    // The result is recorded only once the task's whole process tree is gone (or given up on).
    match reaper::end_descendants(config.grace).await {
        Ok(()) => terminated.all_processes_ended = true,
        Err(leftovers) => {
            let pids: Vec<String> = leftovers.pids.iter().map(i32::to_string).collect();
            terminated.message = format!(
                "{}{}processes of the task could not be ended: [{}]",
                terminated.message,
                if terminated.message.is_empty() {
                    ""
                } else {
                    "; "
                },
                pids.join(", ")
            );
        }
    }
    terminated.finished_at = Some(Time(Timestamp::now()));
    dir.write_exit(&terminated)?;
    Ok(())
}

/// Waits briefly for the lock: the executor probes it for an instant now and then.
async fn take_lock(dir: &TaskDir) -> Result<std::fs::File, ShimError> {
    for _ in 0..50 {
        if let Some(lock) = dir.lock()? {
            return Ok(lock);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(ShimError::Locked(dir.path().to_path_buf()))
}

fn spawn(
    dir: &TaskDir,
    config: &ShimConfig,
    program: &OsString,
    args: &[OsString],
) -> io::Result<tokio::process::Child> {
    if let Some(working_dir) = &config.working_dir
        && !working_dir.is_dir()
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("working directory {} does not exist", working_dir.display()),
        ));
    }
    let log = |path: PathBuf| OpenOptions::new().create(true).append(true).open(path);
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log(dir.stdout_path())?)
        .stderr(log(dir.stderr_path())?)
        .process_group(0)
        .kill_on_drop(false);
    if let Some(working_dir) = &config.working_dir {
        command.current_dir(working_dir);
    }
    super::identity::apply(&mut command, config.run_as);
    command.spawn()
}

/// Sends `signal` to the process group led by `pid`; a group that is already gone is fine.
fn signal_group(pid: u32, signal: Signal) {
    // Never 0 or 1: kill(-1) would signal every process we may signal.
    let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process_group(pid, signal);
}

fn outcome(
    status: ExitStatus,
    cause: Option<StopCause>,
    config: &ShimConfig,
    started_at: Timestamp,
) -> Terminated {
    let signal = status.signal().unwrap_or(0);
    let code = status.code().unwrap_or(128 + signal);
    let grace = config.grace.as_secs_f64();
    let (exit_code, reason, message) = match cause {
        Some(StopCause::Deadline) => {
            let timeout = config.timeout.map(|t| t.as_secs()).unwrap_or_default();
            let how = match signal {
                0 => format!("exited with code {code} after SIGTERM"),
                15 => "ended by SIGTERM".to_string(),
                9 => format!("ignored SIGTERM and was killed with SIGKILL after {grace}s"),
                n => format!("ended by signal {n}"),
            };
            // A timed-out task never reports success, even if it exits 0 on SIGTERM;
            // 124 is what coreutils' `timeout` uses for the same situation.
            let exit_code = if code == 0 { 124 } else { code };
            (
                exit_code,
                REASON_DEADLINE_EXCEEDED,
                format!("exceeded timeoutSeconds={timeout}: {how}"),
            )
        }
        Some(StopCause::Requested) => (
            code,
            REASON_STOPPED,
            "stopped: removed from the task list".to_string(),
        ),
        None if signal != 0 => (code, REASON_ERROR, format!("killed by signal {signal}")),
        None if code == 0 => (0, REASON_COMPLETED, String::new()),
        None => (code, REASON_ERROR, format!("exited with code {code}")),
    };
    Terminated {
        exit_code,
        signal,
        reason: reason.to_string(),
        message,
        started_at: Some(Time(started_at)),
        finished_at: Some(Time(Timestamp::now())),
        all_processes_ended: false,
    }
}

/// Prints a line to stderr for the executor's log (the supervisor's own stdout/stderr are the
/// executor's).
pub fn report_failure(error: &ShimError) {
    let _ = writeln!(io::stderr(), "sandbox-task-executor shim: {error}");
}
