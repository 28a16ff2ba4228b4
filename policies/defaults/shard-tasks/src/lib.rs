//! The default shard-task policy: `taskTemplate` merged with `shardTaskPatches[i]`.
//!
//! Strategic-merge semantics for these fields: scalars and the `command` and `args` lists are
//! replaced whole by the patch; `env` merges by `name` (a patch entry replaces the template's entry
//! of the same name in place, new names are appended in patch order). A shard with neither a
//! template nor a patch runs no task. The controller's built-in behaviour, proven identical by a
//! property test in the controller.

wit_bindgen::generate!({ world: "shard-tasks-policy", path: "../../../wit" });

use exports::opensandbox::policy::shard_tasks::{
    BatchInput, EnvVar, Guest, PolicyError, ProcessTask, TaskSpec,
};

struct TemplateMerge;

impl Guest for TemplateMerge {
    fn validate_settings(settings: String) -> Result<(), PolicyError> {
        match settings.trim() {
            "" | "{}" => Ok(()),
            _ => Err(PolicyError::InvalidSettings(
                "the default shard-tasks policy takes no settings".into(),
            )),
        }
    }

    fn decide(_settings: String, batch: BatchInput) -> Result<Vec<Option<TaskSpec>>, PolicyError> {
        let base = batch.task_template.and_then(|t| t.spec);
        Ok((0..batch.replicas as usize)
            .map(|index| {
                let patch = batch.shard_patches.get(index).and_then(|p| p.spec.as_ref());
                match (&base, patch) {
                    (None, None) => None,
                    (Some(base), None) => Some(base.clone()),
                    (None, Some(patch)) => Some(patch.clone()),
                    (Some(base), Some(patch)) => Some(merge_task(base, patch)),
                }
            })
            .collect())
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

export!(TemplateMerge);
