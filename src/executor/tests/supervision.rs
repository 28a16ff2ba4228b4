//! The per-task supervisor (`sandbox-task-executor shim`) as a real process: whatever a task
//! leaves behind is gone by the time its result is recorded, and only then does the result say
//! `allProcessesEnded`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandbox_executor::store::TaskDir;
use sandbox_executor::wire::{
    REASON_COMPLETED, REASON_DEADLINE_EXCEEDED, REASON_STOPPED, Terminated,
};

const T: Duration = Duration::from_secs(30);

/// True if `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.chars().next())
        .unwrap_or_default();
    !matches!(state, Some('Z' | 'X'))
}

/// Kills a leftover at the end of a test, whatever happened.
struct Reap(u32);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32).filter(|_| self.0 > 1) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Starts a supervisor for `sh -c script` in `dir`.
fn supervise(dir: &Path, script: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sandbox-task-executor"))
        .arg("shim")
        .arg("--task-dir")
        .arg(dir)
        .args(["--grace-ms", "300"])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning the supervisor")
}

fn wait_for<V>(what: &str, mut f: impl FnMut() -> Option<V>) -> V {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_pid(path: &Path) -> u32 {
    wait_for(&format!("a pid in {}", path.display()), || {
        std::fs::read_to_string(path)
            .ok()
            .filter(|s| s.ends_with('\n'))
            .and_then(|s| s.trim().parse().ok())
    })
}

/// Waits for the recorded result. Each time the result is seen, `leftover` must already be gone:
/// a result is never recorded while a process of the task lives.
fn result_once_gone(dir: &TaskDir, leftover: u32) -> Terminated {
    wait_for("the task's result", || {
        let result = dir.read_exit().expect("readable result")?;
        // Processes do not come back: alive now means alive when the result was written.
        assert!(
            !alive(leftover),
            "the result was recorded while process {leftover} still ran: {result:?}"
        );
        Some(result)
    })
}

fn finish(mut supervisor: Child) {
    let status = wait_for("the supervisor to exit", || {
        supervisor.try_wait().ok().flatten()
    });
    assert!(status.success(), "supervisor exited with {status}");
}

#[test]
fn a_background_child_of_a_finished_task_is_ended_before_the_result() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = TaskDir::at(tmp.path().join("task"));
    dir.recreate().expect("task dir");
    let pid_file = tmp.path().join("leftover");
    let supervisor = supervise(
        dir.path(),
        &format!("sleep 1000 & echo $! > {}; exit 0", pid_file.display()),
        &[],
    );
    let leftover = read_pid(&pid_file);
    let _reap = Reap(leftover);
    let result = result_once_gone(&dir, leftover);
    assert!(!alive(leftover), "sleep {leftover} outlived its task");
    assert_eq!(
        (result.exit_code, result.reason.as_str()),
        (0, REASON_COMPLETED)
    );
    assert!(result.all_processes_ended, "{result:?}");
    finish(supervisor);
}

#[test]
fn a_setsid_child_and_a_double_forked_daemon_are_ended_when_the_task_is_stopped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = TaskDir::at(tmp.path().join("task"));
    dir.recreate().expect("task dir");
    let (setsid_file, daemon_file) = (tmp.path().join("setsid"), tmp.path().join("daemon"));
    let script = format!(
        "setsid sleep 1000 & echo $! > {s}; (sleep 1000 & echo $! > {d}) ; exec sleep 1000",
        s = setsid_file.display(),
        d = daemon_file.display()
    );
    let supervisor = supervise(dir.path(), &script, &[]);
    let (setsid, daemon) = (read_pid(&setsid_file), read_pid(&daemon_file));
    let (_a, _b) = (Reap(setsid), Reap(daemon));
    assert!(alive(setsid) && alive(daemon));
    // The executor stops a task by sending its supervisor SIGTERM.
    let pid = rustix::process::Pid::from_raw(supervisor.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let result = result_once_gone(&dir, setsid);
    assert!(
        !alive(setsid) && !alive(daemon),
        "left behind: setsid child {setsid} alive={}, daemon {daemon} alive={}",
        alive(setsid),
        alive(daemon)
    );
    assert_eq!(result.reason, REASON_STOPPED);
    assert!(result.all_processes_ended, "{result:?}");
    finish(supervisor);
}

#[test]
fn a_timed_out_task_loses_its_setsid_child_too() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = TaskDir::at(tmp.path().join("task"));
    dir.recreate().expect("task dir");
    let pid_file = tmp.path().join("leftover");
    let supervisor = supervise(
        dir.path(),
        &format!(
            "setsid sleep 1000 & echo $! > {}; exec sleep 1000",
            pid_file.display()
        ),
        &["--timeout-seconds", "1"],
    );
    let leftover = read_pid(&pid_file);
    let _reap = Reap(leftover);
    let result = result_once_gone(&dir, leftover);
    assert!(
        !alive(leftover),
        "setsid sleep {leftover} outlived its task"
    );
    assert_eq!(result.reason, REASON_DEADLINE_EXCEEDED);
    assert!(result.all_processes_ended, "{result:?}");
    finish(supervisor);
}
