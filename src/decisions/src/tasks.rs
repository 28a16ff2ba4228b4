//! Shard tasks: the task types of `taskTemplate` and `shardTaskPatches`, and their merge, the
//! decision the default shard-task policy makes.
//!
//! Merge semantics follow strategic merge patch for these fields: scalars and the `command` and
//! `args` lists are replaced whole by the patch; `env` merges by `name` (a patch entry replaces the
//! template's entry of the same name in place, new names are appended in patch order).

use alloc::string::String;
use alloc::vec::Vec;

/// A task to run inside a sandbox once it is ready.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct TaskTemplateSpec {
    /// What the task runs and for how long.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub spec: Option<TaskSpec>,
}

/// The task's process and its time limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serde", serde(rename_all = "camelCase"))]
pub struct TaskSpec {
    /// The process to run in the sandbox.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub process: Option<ProcessTask>,
    /// Longest run time in seconds. At the limit the task executor sends SIGTERM, then SIGKILL
    /// after a grace period. Unset means no limit. Must be greater than 0.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub timeout_seconds: Option<i64>,
}

/// A process started directly (never through a shell), so arguments are passed literally.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serde", serde(rename_all = "camelCase"))]
pub struct ProcessTask {
    /// The executable and any leading arguments. Required after `taskTemplate` and this shard's
    /// patch are merged; a shard patch that sets it replaces the template's command whole.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub command: Option<Vec<String>>,
    /// Arguments after the command. A shard patch that sets them replaces the template's list whole.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub args: Option<Vec<String>>,
    /// Environment variables. A shard patch merges with the template's list by `name`.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub env: Option<Vec<EnvVar>>,
    /// Working directory of the process. Defaults to the task executor's own.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub working_dir: Option<String>,
}

/// One environment variable of a task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct EnvVar {
    /// Variable name: letters, digits, `_`, `-` and `.`, not starting with a digit.
    pub name: String,
    /// Variable value. Empty when unset.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub value: Option<String>,
}

/// What shard-task generation sees of a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ShardTaskInput {
    pub batch_name: String,
    pub replicas: u32,
    pub task_template: Option<TaskTemplateSpec>,
    pub shard_patches: Vec<TaskTemplateSpec>,
}

/// The tasks of a batch, one slot per shard (`None`: that shard runs no task).
pub type ShardTasks = Vec<Option<TaskSpec>>;

/// State of one shard's task, as the controller observes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum TaskPhase {
    /// The shard has no task.
    None,
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

/// The default shard-task decision: every shard's task, in shard order.
pub fn template_merge(batch: &ShardTaskInput) -> ShardTasks {
    shard_tasks(
        batch.replicas as usize,
        batch.task_template.as_ref(),
        &batch.shard_patches,
    )
}

/// The task of every shard, `None` for a shard with neither a template nor a patch.
pub fn shard_tasks(
    replicas: usize,
    template: Option<&TaskTemplateSpec>,
    patches: &[TaskTemplateSpec],
) -> Vec<Option<TaskSpec>> {
    (0..replicas)
        .map(|index| shard_task(template, patches.get(index)))
        .collect()
}

/// The task of one shard: the template's spec merged with the shard's patch.
pub fn shard_task(
    template: Option<&TaskTemplateSpec>,
    patch: Option<&TaskTemplateSpec>,
) -> Option<TaskSpec> {
    let base = template.and_then(|t| t.spec.as_ref());
    let patch = patch.and_then(|p| p.spec.as_ref());
    match (base, patch) {
        (None, None) => None,
        (Some(base), None) => Some(base.clone()),
        (None, Some(patch)) => Some(patch.clone()),
        (Some(base), Some(patch)) => Some(merge_task(base, patch)),
    }
}

fn merge_task(base: &TaskSpec, patch: &TaskSpec) -> TaskSpec {
    TaskSpec {
        process: match (&base.process, &patch.process) {
            (None, None) => None,
            (Some(b), None) => Some(b.clone()),
            (None, Some(p)) => Some(p.clone()),
            (Some(b), Some(p)) => Some(merge_process(b, p)),
        },
        timeout_seconds: patch.timeout_seconds.or(base.timeout_seconds),
    }
}

fn merge_process(base: &ProcessTask, patch: &ProcessTask) -> ProcessTask {
    ProcessTask {
        command: patch.command.clone().or_else(|| base.command.clone()),
        args: patch.args.clone().or_else(|| base.args.clone()),
        env: merge_env(base.env.as_deref(), patch.env.as_deref()),
        working_dir: patch
            .working_dir
            .clone()
            .or_else(|| base.working_dir.clone()),
    }
}

fn merge_env(base: Option<&[EnvVar]>, patch: Option<&[EnvVar]>) -> Option<Vec<EnvVar>> {
    match (base, patch) {
        (None, None) => None,
        (Some(b), None) => Some(b.to_vec()),
        (None, Some(p)) => Some(p.to_vec()),
        (Some(b), Some(p)) => {
            let mut merged = b.to_vec();
            for entry in p {
                match merged
                    .iter_mut()
                    .find(|existing| existing.name == entry.name)
                {
                    Some(existing) => *existing = entry.clone(),
                    None => merged.push(entry.clone()),
                }
            }
            Some(merged)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    fn env(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
        }
    }

    fn task(command: &[&str], args: &[&str], envs: Vec<EnvVar>) -> TaskTemplateSpec {
        TaskTemplateSpec {
            spec: Some(TaskSpec {
                process: Some(ProcessTask {
                    command: Some(command.iter().map(|s| s.to_string()).collect()),
                    args: Some(args.iter().map(|s| s.to_string()).collect()),
                    env: Some(envs),
                    working_dir: None,
                }),
                timeout_seconds: None,
            }),
        }
    }

    #[test]
    fn spec_heterogeneous_example_gives_each_shard_its_patch() {
        let template = task(
            &["echo"],
            &["Default message"],
            vec![env("TASK_TYPE", "default")],
        );
        let patches = vec![
            task(
                &["python"],
                &["-m", "http.server", "8080"],
                vec![env("TASK_TYPE", "web-server")],
            ),
            task(
                &["bash"],
                &["-c", "while true; do date; sleep 5; done"],
                vec![env("TASK_TYPE", "logger")],
            ),
            task(&["sleep"], &["3600"], vec![env("TASK_TYPE", "idle")]),
        ];
        let tasks = shard_tasks(3, Some(&template), &patches);
        let process = |i: usize| tasks[i].as_ref().unwrap().process.as_ref().unwrap().clone();
        assert_eq!(process(0).command.unwrap(), ["python"]);
        assert_eq!(
            process(1).args.unwrap(),
            ["-c", "while true; do date; sleep 5; done"]
        );
        assert_eq!(process(2).env.unwrap(), vec![env("TASK_TYPE", "idle")]);
    }

    #[test]
    fn shards_beyond_the_patches_get_the_template() {
        let template = task(&["echo"], &["hi"], vec![]);
        let tasks = shard_tasks(3, Some(&template), &[task(&["true"], &[], vec![])]);
        assert_eq!(tasks[2], template.spec);
    }

    #[test]
    fn shards_without_template_or_patch_have_no_task() {
        // The spec's test-runners example: 10 replicas, two patches, no template.
        let patches = vec![
            task(&["pytest"], &["tests/unit"], vec![]),
            task(&["pytest"], &["tests/integration"], vec![]),
        ];
        let tasks = shard_tasks(10, None, &patches);
        assert!(tasks[0].is_some() && tasks[1].is_some());
        assert!(tasks[2..].iter().all(Option::is_none));
    }

    #[test]
    fn env_merges_by_name_in_place_and_appends_new_names() {
        let template = task(&["run"], &[], vec![env("A", "1"), env("B", "2")]);
        let patch = TaskTemplateSpec {
            spec: Some(TaskSpec {
                process: Some(ProcessTask {
                    env: Some(vec![env("C", "3"), env("A", "9")]),
                    ..Default::default()
                }),
                timeout_seconds: Some(5),
            }),
        };
        let merged = shard_task(Some(&template), Some(&patch)).unwrap();
        let process = merged.process.unwrap();
        assert_eq!(
            process.env.unwrap(),
            vec![env("A", "9"), env("B", "2"), env("C", "3")]
        );
        assert_eq!(
            process.command.unwrap(),
            ["run"],
            "an unset command keeps the template's"
        );
        assert_eq!(merged.timeout_seconds, Some(5));
    }

    /// Tasks whose env lists name each variable once, as a template's must (env is keyed by name).
    fn arb_task() -> impl Strategy<Value = TaskTemplateSpec> {
        let words = prop::collection::vec("[a-z]{1,4}", 0..3);
        let envs = prop::collection::btree_map("[A-C]", "[a-z]{0,3}", 0..4).prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(n, v)| env(&n, &v))
                .collect::<Vec<_>>()
        });
        (
            prop::option::of(words.clone()),
            prop::option::of(words),
            prop::option::of(envs),
            prop::option::of(1i64..100),
        )
            .prop_map(|(command, args, env, timeout_seconds)| TaskTemplateSpec {
                spec: Some(TaskSpec {
                    process: Some(ProcessTask {
                        command,
                        args,
                        env,
                        working_dir: None,
                    }),
                    timeout_seconds,
                }),
            })
    }

    proptest! {
        #[test]
        fn merge_is_identity_without_patch_and_patch_fields_always_win(base in arb_task(), patch in arb_task()) {
            prop_assert_eq!(shard_task(Some(&base), None), base.spec.clone());
            let merged = shard_task(Some(&base), Some(&patch)).unwrap();
            let (mp, pp, bp) = (
                merged.process.unwrap(),
                patch.spec.as_ref().unwrap().process.clone().unwrap(),
                base.spec.as_ref().unwrap().process.clone().unwrap(),
            );
            prop_assert_eq!(mp.command, pp.command.or(bp.command));
            prop_assert_eq!(mp.args, pp.args.or(bp.args));
            // Every env name of either side appears exactly once, with the value of the patch's
            // last entry of that name if the patch has one, else the template's.
            let names: std::collections::BTreeSet<_> = bp.env.iter().flatten().chain(pp.env.iter().flatten()).map(|e| e.name.clone()).collect();
            let merged_env = mp.env.unwrap_or_default();
            for name in names {
                let hits: Vec<_> = merged_env.iter().filter(|e| e.name == name).collect();
                prop_assert_eq!(hits.len(), 1, "env {} appears {} times in {:?}", name, hits.len(), merged_env);
                let expected = pp.env.iter().flatten().rev().find(|e| e.name == name)
                    .or_else(|| bp.env.iter().flatten().find(|e| e.name == name));
                prop_assert_eq!(Some(hits[0]), expected);
            }
        }

        #[test]
        fn there_is_one_task_slot_per_shard(replicas in 0usize..40, patches in prop::collection::vec(arb_task(), 0..5)) {
            prop_assert_eq!(shard_tasks(replicas, None, &patches).len(), replicas);
        }
    }
}
