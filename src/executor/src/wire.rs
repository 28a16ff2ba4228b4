//! The task executor's JSON wire format, shared by the server and the controller's client.
//!
//! Field names match OpenSandbox's task executor (`kubernetes/pkg/task-executor/types.go`), so
//! its clients can talk to this executor: `POST /setTasks` takes a JSON array of [`Task`]s (the
//! desired list) and, like `GET /getTasks`, answers with the current list including each task's
//! `processStatus`. Go clients send `null` for empty slices and zero times, so every list and
//! optional field here accepts `null`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Deserializer, Serialize};

use sandbox_decisions::tasks::TaskPhase;
use sandbox_decisions::tasks::TaskSpec;

/// Longest task name: task names become directory names in the executor's data directory.
pub const MAX_TASK_NAME_LEN: usize = 253;

/// One task: what to run and, in responses, how it is doing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// Unique within one executor; letters, digits, `-`, `_` and `.`, not starting with `.`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    /// Set by the executor once the task has left the desired list and is being stopped; the task
    /// disappears from the list when its process has terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<Time>,
    /// The process to run. Required: this executor runs process tasks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    /// OpenSandbox's pod-template tasks. Accepted on the wire only to be refused with a clear
    /// message instead of being silently ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_spec: Option<serde_json::Value>,
    /// The process's state; set in responses only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_status: Option<ProcessStatus>,
}

/// A process started directly with `execve` semantics: no shell, no interpolation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// The executable (looked up in `PATH` when it has no `/`) and its leading arguments.
    #[serde(default, deserialize_with = "null_as_default")]
    pub command: Vec<String>,
    /// Arguments after `command`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub args: Vec<String>,
    /// Variables added to the executor's environment for this process.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub env: Vec<EnvVar>,
    /// Working directory; the executor's own when empty.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub working_dir: String,
    /// Longest run time. At the limit the process group gets SIGTERM, then SIGKILL after the
    /// executor's grace period. Unset means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

/// One environment variable (the shape of Kubernetes' `EnvVar`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub value: String,
    /// Kubernetes' `valueFrom`: there is no API server to resolve it against inside a pod, so a
    /// task that uses it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<serde_json::Value>,
}

/// Exactly one member is set: the process is waiting to start, running, or has terminated.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<Terminated>,
}

/// Not started yet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Waiting {
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub reason: String,
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub message: String,
}

/// Started and not yet terminated.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Running {
    #[serde(default)]
    pub started_at: Option<Time>,
}

/// Finished, for whatever reason.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Terminated {
    /// The exit code; `128 + N` when killed by signal N. Never 0 for a task that failed.
    pub exit_code: i32,
    /// The signal that killed the process, 0 if it exited by itself.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub signal: i32,
    /// One of the `REASON_*` constants.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub reason: String,
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The executor's confirmation that every process of the task ended: its own process and
    /// everything it started, including children that left its process group or session. Set
    /// only once the task's supervisor saw its process tree empty; absent (false) means not
    /// confirmed (processes may remain, or the supervisor itself was lost). A task that left the
    /// desired list is dropped from the list only with this confirmation, so an empty list from
    /// `POST /setTasks []` means every process of every task has ended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_processes_ended: bool,
}

/// The process exited with code 0.
pub const REASON_COMPLETED: &str = "Completed";
/// The process exited with a non-zero code, or was killed by a signal it was not sent by us.
pub const REASON_ERROR: &str = "Error";
/// `timeoutSeconds` passed; the process was sent SIGTERM, then SIGKILL after the grace period.
pub const REASON_DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
/// The task left the desired list and was stopped.
pub const REASON_STOPPED: &str = "Stopped";
/// The process could not be started (executable missing, bad working directory, ...).
pub const REASON_START_ERROR: &str = "StartError";
/// The task's supervisor vanished without recording a result (for example it was SIGKILLed), so
/// the outcome is unknown; reported as a failure.
pub const REASON_LOST: &str = "Lost";

/// The body of every error response (OpenSandbox's `ErrorResponse`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// The HTTP status text, e.g. `Unauthorized`.
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// Why a task cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTask {
    #[error(
        "task name {0:?} is invalid: use 1-253 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    Name(String),
    #[error("task {0:?} appears more than once in the list")]
    Duplicate(String),
    #[error("task {0:?} has no process; this executor runs process tasks only")]
    NoProcess(String),
    #[error("task {0:?} is a podTemplateSpec task; this executor runs process tasks only")]
    PodTemplate(String),
    #[error("task {0:?} has an empty command")]
    EmptyCommand(String),
    #[error("task {0:?}: an argument or the working directory contains a NUL byte")]
    NulByte(String),
    #[error("task {task:?}: environment variable name {var:?} is invalid")]
    EnvName { task: String, var: String },
    #[error(
        "task {task:?}: environment variable {var:?} uses valueFrom, which the executor cannot resolve"
    )]
    EnvValueFrom { task: String, var: String },
    #[error("task {task:?}: timeoutSeconds must be greater than 0, got {value}")]
    Timeout { task: String, value: i64 },
}

impl Task {
    /// The wire form of a merged shard task, named `name`.
    pub fn from_spec(name: impl Into<String>, spec: &TaskSpec) -> Result<Task, InvalidTask> {
        let name = name.into();
        let Some(process) = spec.process.as_ref() else {
            return Err(InvalidTask::NoProcess(name));
        };
        let task = Task {
            process: Some(Process {
                command: process.command.clone().unwrap_or_default(),
                args: process.args.clone().unwrap_or_default(),
                env: process
                    .env
                    .iter()
                    .flatten()
                    .map(|var| EnvVar {
                        name: var.name.clone(),
                        value: var.value.clone().unwrap_or_default(),
                        value_from: None,
                    })
                    .collect(),
                working_dir: process.working_dir.clone().unwrap_or_default(),
                timeout_seconds: spec.timeout_seconds,
            }),
            name,
            ..Task::default()
        };
        task.validate()?;
        Ok(task)
    }

    /// Checks that the executor can run this task as given.
    pub fn validate(&self) -> Result<(), InvalidTask> {
        let name = &self.name;
        if !valid_task_name(name) {
            return Err(InvalidTask::Name(name.clone()));
        }
        if self.pod_template_spec.is_some() {
            return Err(InvalidTask::PodTemplate(name.clone()));
        }
        let Some(process) = &self.process else {
            return Err(InvalidTask::NoProcess(name.clone()));
        };
        if process.command.first().is_none_or(|c| c.is_empty()) {
            return Err(InvalidTask::EmptyCommand(name.clone()));
        }
        let strings = process
            .command
            .iter()
            .chain(&process.args)
            .chain(std::iter::once(&process.working_dir));
        if strings
            .chain(process.env.iter().map(|v| &v.value))
            .any(|s| s.contains('\0'))
        {
            return Err(InvalidTask::NulByte(name.clone()));
        }
        for var in &process.env {
            if !valid_env_name(&var.name) {
                return Err(InvalidTask::EnvName {
                    task: name.clone(),
                    var: var.name.clone(),
                });
            }
            if var.value_from.is_some() {
                return Err(InvalidTask::EnvValueFrom {
                    task: name.clone(),
                    var: var.name.clone(),
                });
            }
        }
        if let Some(value) = process.timeout_seconds.filter(|t| *t <= 0) {
            return Err(InvalidTask::Timeout {
                task: name.clone(),
                value,
            });
        }
        Ok(())
    }

    /// The phase the BatchSandbox status counts this task in. A task being stopped still counts
    /// as running until its process has terminated.
    pub fn phase(&self) -> TaskPhase {
        let Some(status) = &self.process_status else {
            return TaskPhase::Pending;
        };
        if let Some(terminated) = &status.terminated {
            return terminated.phase();
        }
        if status.running.is_some() {
            return TaskPhase::Running;
        }
        TaskPhase::Pending
    }

    /// True once the process has terminated (whatever the outcome).
    pub fn is_terminated(&self) -> bool {
        self.process_status
            .as_ref()
            .is_some_and(|s| s.terminated.is_some())
    }

    /// True once the task has terminated and the executor confirmed that every process it
    /// started has ended too.
    pub fn all_processes_ended(&self) -> bool {
        self.process_status
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.all_processes_ended)
    }
}

impl Terminated {
    pub fn phase(&self) -> TaskPhase {
        if self.exit_code == 0
            && self.reason != REASON_DEADLINE_EXCEEDED
            && self.reason != REASON_LOST
        {
            TaskPhase::Succeeded
        } else {
            TaskPhase::Failed
        }
    }
}

/// Checks a whole desired list: every task valid, no name twice.
pub fn validate_tasks(tasks: &[Task]) -> Result<(), InvalidTask> {
    let mut seen = std::collections::HashSet::new();
    for task in tasks {
        task.validate()?;
        if !seen.insert(task.name.as_str()) {
            return Err(InvalidTask::Duplicate(task.name.clone()));
        }
    }
    Ok(())
}

/// Task names become directory names, so only a safe alphabet is allowed.
pub fn valid_task_name(name: &str) -> bool {
    (1..=MAX_TASK_NAME_LEN).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// POSIX-portable names plus the `-` and `.` Kubernetes allows; never empty, no `=`, no NUL.
fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

/// Go marshals nil slices and empty values as `null`; treat that as the default.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sandbox_decisions::tasks::{EnvVar as SpecEnvVar, ProcessTask};

    fn process_task(name: &str, command: &[&str]) -> Task {
        Task {
            name: name.into(),
            process: Some(Process {
                command: command.iter().map(|s| s.to_string()).collect(),
                ..Process::default()
            }),
            ..Task::default()
        }
    }

    #[test]
    fn decodes_what_opensandbox_go_clients_send() {
        // encoding/json output for a Task with nil Args/Env and a zero-value status.
        let json = r#"[{"name":"batch-0","process":{"command":["echo"],"args":null,"env":null,
            "workingDir":"","timeoutSeconds":30},"processStatus":{"running":{"startedAt":null}}}]"#;
        let tasks: Vec<Task> = serde_json::from_str(json).unwrap();
        assert_eq!(tasks.len(), 1);
        let process = tasks[0].process.as_ref().unwrap();
        assert_eq!(process.command, ["echo"]);
        assert!(
            process.args.is_empty() && process.env.is_empty() && process.working_dir.is_empty()
        );
        assert_eq!(process.timeout_seconds, Some(30));
        assert_eq!(tasks[0].phase(), TaskPhase::Running);
    }

    #[test]
    fn encodes_opensandbox_field_names() {
        let task = Task {
            name: "t".into(),
            deletion_timestamp: Some(Time("2026-01-02T03:04:05Z".parse().unwrap())),
            process: Some(Process {
                command: vec!["sh".into()],
                args: vec!["-c".into(), "exit 3".into()],
                env: vec![EnvVar {
                    name: "A".into(),
                    value: "b".into(),
                    value_from: None,
                }],
                working_dir: "/tmp".into(),
                timeout_seconds: Some(5),
            }),
            pod_template_spec: None,
            process_status: Some(ProcessStatus {
                terminated: Some(Terminated {
                    exit_code: 3,
                    reason: REASON_ERROR.into(),
                    ..Terminated::default()
                }),
                ..ProcessStatus::default()
            }),
        };
        let value = serde_json::to_value(&task).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "name": "t",
                "deletionTimestamp": "2026-01-02T03:04:05Z",
                "process": {"command": ["sh"], "args": ["-c", "exit 3"], "env": [{"name": "A", "value": "b"}],
                            "workingDir": "/tmp", "timeoutSeconds": 5},
                "processStatus": {"terminated": {"exitCode": 3, "reason": "Error"}}
            })
        );
        let back: Task = serde_json::from_value(value).unwrap();
        assert_eq!(back, task);
    }

    #[test]
    fn phases_follow_the_process_state() {
        let mut task = process_task("t", &["true"]);
        assert_eq!(task.phase(), TaskPhase::Pending);
        let terminated = |exit_code, reason: &str| ProcessStatus {
            terminated: Some(Terminated {
                exit_code,
                reason: reason.into(),
                ..Terminated::default()
            }),
            ..ProcessStatus::default()
        };
        task.process_status = Some(ProcessStatus {
            waiting: Some(Waiting::default()),
            ..ProcessStatus::default()
        });
        assert_eq!(task.phase(), TaskPhase::Pending);
        task.process_status = Some(ProcessStatus {
            running: Some(Running { started_at: None }),
            ..ProcessStatus::default()
        });
        assert_eq!(task.phase(), TaskPhase::Running);
        task.process_status = Some(terminated(0, REASON_COMPLETED));
        assert_eq!(task.phase(), TaskPhase::Succeeded);
        task.process_status = Some(terminated(1, REASON_ERROR));
        assert_eq!(task.phase(), TaskPhase::Failed);
        task.process_status = Some(terminated(0, REASON_DEADLINE_EXCEEDED));
        assert_eq!(task.phase(), TaskPhase::Failed);
        task.process_status = Some(terminated(0, REASON_LOST));
        assert_eq!(task.phase(), TaskPhase::Failed);
    }

    #[test]
    fn from_spec_carries_every_field() {
        let spec = TaskSpec {
            process: Some(ProcessTask {
                command: Some(vec!["python".into()]),
                args: Some(vec!["-m".into(), "http.server".into()]),
                env: Some(vec![
                    SpecEnvVar {
                        name: "TASK_TYPE".into(),
                        value: Some("web".into()),
                    },
                    SpecEnvVar {
                        name: "EMPTY".into(),
                        value: None,
                    },
                ]),
                working_dir: Some("/srv".into()),
            }),
            timeout_seconds: Some(60),
        };
        let task = Task::from_spec("b-0", &spec).unwrap();
        let process = task.process.unwrap();
        assert_eq!(task.name, "b-0");
        assert_eq!(process.command, ["python"]);
        assert_eq!(process.args, ["-m", "http.server"]);
        assert_eq!(
            process.env[0],
            EnvVar {
                name: "TASK_TYPE".into(),
                value: "web".into(),
                value_from: None
            }
        );
        assert_eq!(process.env[1].value, "");
        assert_eq!(process.working_dir, "/srv");
        assert_eq!(process.timeout_seconds, Some(60));
        assert_eq!(
            Task::from_spec("b-1", &TaskSpec::default()),
            Err(InvalidTask::NoProcess("b-1".into()))
        );
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let ok = process_task("ok", &["true"]);
        assert_eq!(ok.validate(), Ok(()));
        assert!(matches!(
            process_task("../x", &["true"]).validate(),
            Err(InvalidTask::Name(_))
        ));
        assert!(matches!(
            process_task("", &["true"]).validate(),
            Err(InvalidTask::Name(_))
        ));
        assert!(matches!(
            process_task("t", &[]).validate(),
            Err(InvalidTask::EmptyCommand(_))
        ));
        assert!(matches!(
            process_task("t", &[""]).validate(),
            Err(InvalidTask::EmptyCommand(_))
        ));
        assert!(matches!(
            process_task("t", &["a\0b"]).validate(),
            Err(InvalidTask::NulByte(_))
        ));
        let mut pod = ok.clone();
        pod.pod_template_spec = Some(serde_json::json!({}));
        assert!(matches!(pod.validate(), Err(InvalidTask::PodTemplate(_))));
        let mut timeout = ok.clone();
        timeout.process.as_mut().unwrap().timeout_seconds = Some(0);
        assert!(matches!(
            timeout.validate(),
            Err(InvalidTask::Timeout { value: 0, .. })
        ));
        let mut env = ok.clone();
        env.process.as_mut().unwrap().env = vec![EnvVar {
            name: "A=B".into(),
            ..EnvVar::default()
        }];
        assert!(matches!(env.validate(), Err(InvalidTask::EnvName { .. })));
        env.process.as_mut().unwrap().env = vec![EnvVar {
            name: "A".into(),
            value_from: Some(serde_json::json!({})),
            ..EnvVar::default()
        }];
        assert!(matches!(
            env.validate(),
            Err(InvalidTask::EnvValueFrom { .. })
        ));
        assert_eq!(
            validate_tasks(&[ok.clone(), ok.clone()]),
            Err(InvalidTask::Duplicate("ok".into()))
        );
    }

    proptest! {
        #[test]
        fn accepted_names_are_single_safe_path_components(name in "\\PC{0,40}") {
            if valid_task_name(&name) {
                prop_assert!(!name.contains('/') && name != "." && name != ".." && !name.is_empty());
                let path = std::path::Path::new("/data").join(&name);
                prop_assert_eq!(path.parent(), Some(std::path::Path::new("/data")));
            }
        }

        #[test]
        fn tasks_round_trip_through_json(
            name in "[a-z][a-z0-9-]{0,20}",
            command in proptest::collection::vec(".{1,10}", 1..4),
            args in proptest::collection::vec(".{0,10}", 0..4),
            timeout in proptest::option::of(1i64..100_000),
        ) {
            let task = Task {
                name,
                process: Some(Process { command, args, timeout_seconds: timeout, ..Process::default() }),
                ..Task::default()
            };
            let json = serde_json::to_string(&task).unwrap();
            prop_assert_eq!(serde_json::from_str::<Task>(&json).unwrap(), task);
        }
    }
}
