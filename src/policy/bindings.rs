//! Host bindings generated from `wit/` (one module per world), and conversions between the
//! generated types and the domain types the reconcilers use.

use crate::api::{EnvVar, ProcessTask, TaskSpec, TaskTemplateSpec};
use crate::domain::expiry::{BatchSnapshot, ExpireAction, ExpiryDecision, TaskPhase};
use crate::domain::sizing::{PoolSnapshot, SizingDecision};
use crate::policy::ShardTaskInput;

pub mod sizing {
    wasmtime::component::bindgen!({ world: "pool-sizing-policy", path: "wit" });
    pub use exports::opensandbox::policy::pool_sizing as wit;
}

pub mod shard {
    wasmtime::component::bindgen!({ world: "shard-tasks-policy", path: "wit" });
    pub use exports::opensandbox::policy::shard_tasks as wit;
}

pub mod expiry {
    wasmtime::component::bindgen!({ world: "expiry-policy", path: "wit" });
    pub use exports::opensandbox::policy::expiry as wit;
}

/// The text of a guest's typed error (the generated `Display` shows its debug form).
pub trait GuestError {
    fn text(&self) -> String;
}

macro_rules! guest_error_text {
    ($module:ident) => {
        impl GuestError for $module::wit::PolicyError {
            fn text(&self) -> String {
                match self {
                    Self::InvalidSettings(m) => format!("invalid settings: {m}"),
                    Self::InvalidInput(m) => format!("invalid input: {m}"),
                    Self::Internal(m) => format!("internal error: {m}"),
                }
            }
        }
    };
}
guest_error_text!(sizing);
guest_error_text!(shard);
guest_error_text!(expiry);

impl From<&PoolSnapshot> for sizing::wit::PoolSnapshot {
    fn from(p: &PoolSnapshot) -> Self {
        let b = p.bounds;
        Self {
            pool_name: p.pool_name.clone(),
            bounds: sizing::wit::Bounds {
                buffer_min: b.buffer_min,
                buffer_max: b.buffer_max,
                pool_min: b.pool_min,
                pool_max: b.pool_max,
            },
            total: p.total,
            allocated: p.allocated,
            available: p.available,
            pending: p.pending,
            terminating: p.terminating,
            unmet_demand: p.unmet_demand,
            recent_allocations: p
                .recent_allocations
                .iter()
                .map(|e| sizing::wit::AllocationEvent {
                    at_unix_ms: e.at_unix_ms,
                    count: e.count,
                })
                .collect(),
            now_unix_ms: p.now_unix_ms,
        }
    }
}

impl From<sizing::wit::SizingDecision> for SizingDecision {
    fn from(d: sizing::wit::SizingDecision) -> Self {
        Self {
            desired_total: d.desired_total,
            reason: d.reason,
        }
    }
}

impl From<&ShardTaskInput> for shard::wit::BatchInput {
    fn from(b: &ShardTaskInput) -> Self {
        Self {
            batch_name: b.batch_name.clone(),
            replicas: b.replicas,
            task_template: b.task_template.as_ref().map(Into::into),
            shard_patches: b.shard_patches.iter().map(Into::into).collect(),
        }
    }
}

impl From<&TaskTemplateSpec> for shard::wit::TaskTemplate {
    fn from(t: &TaskTemplateSpec) -> Self {
        Self {
            spec: t.spec.as_ref().map(Into::into),
        }
    }
}

impl From<&TaskSpec> for shard::wit::TaskSpec {
    fn from(t: &TaskSpec) -> Self {
        Self {
            process: t.process.as_ref().map(Into::into),
            timeout_seconds: t.timeout_seconds,
        }
    }
}

impl From<&ProcessTask> for shard::wit::ProcessTask {
    fn from(p: &ProcessTask) -> Self {
        Self {
            command: p.command.clone(),
            args: p.args.clone(),
            env: p.env.as_ref().map(|env| {
                env.iter()
                    .map(|e| shard::wit::EnvVar {
                        name: e.name.clone(),
                        value: e.value.clone(),
                    })
                    .collect()
            }),
            working_dir: p.working_dir.clone(),
        }
    }
}

impl From<shard::wit::TaskSpec> for TaskSpec {
    fn from(t: shard::wit::TaskSpec) -> Self {
        Self {
            process: t.process.map(Into::into),
            timeout_seconds: t.timeout_seconds,
        }
    }
}

impl From<shard::wit::ProcessTask> for ProcessTask {
    fn from(p: shard::wit::ProcessTask) -> Self {
        Self {
            command: p.command,
            args: p.args,
            env: p.env.map(|env| {
                env.into_iter()
                    .map(|e| EnvVar {
                        name: e.name,
                        value: e.value,
                    })
                    .collect()
            }),
            working_dir: p.working_dir,
        }
    }
}

impl From<&BatchSnapshot> for expiry::wit::BatchSnapshot {
    fn from(b: &BatchSnapshot) -> Self {
        Self {
            name: b.name.clone(),
            expire_time_unix_ms: b.expire_time_unix_ms,
            now_unix_ms: b.now_unix_ms,
            pooled: b.pooled,
            task_phases: b.task_phases.iter().map(|&p| p.into()).collect(),
        }
    }
}

impl From<TaskPhase> for expiry::wit::TaskPhase {
    fn from(p: TaskPhase) -> Self {
        match p {
            TaskPhase::None => Self::NoTask,
            TaskPhase::Pending => Self::Pending,
            TaskPhase::Running => Self::Running,
            TaskPhase::Succeeded => Self::Succeeded,
            TaskPhase::Failed => Self::Failed,
            TaskPhase::Unknown => Self::Unknown,
        }
    }
}

impl From<expiry::wit::ExpiryDecision> for ExpiryDecision {
    fn from(d: expiry::wit::ExpiryDecision) -> Self {
        match d {
            expiry::wit::ExpiryDecision::Keep(recheck_after_ms) => Self::Keep { recheck_after_ms },
            expiry::wit::ExpiryDecision::Expire(action) => Self::Expire {
                action: match action {
                    expiry::wit::ExpireAction::Delete => ExpireAction::Delete,
                    expiry::wit::ExpireAction::ReturnToPool => ExpireAction::ReturnToPool,
                },
            },
        }
    }
}
