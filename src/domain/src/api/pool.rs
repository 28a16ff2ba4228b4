//! `Pool`: a set of pre-warmed pods that pooled BatchSandboxes allocate from.
// kube's derive takes one `printcolumn(...)` per column; clippy reads the repeats as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The desired state of a Pool.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "sandbox.opensandbox.io",
    version = "v1alpha1",
    kind = "Pool",
    namespaced,
    status = "PoolStatus",
    doc = "Pool keeps a buffer of pre-warmed sandbox pods that pooled BatchSandboxes allocate from, sized between its capacity bounds.",
    printcolumn(
        name = "TOTAL",
        type_ = "integer",
        json_path = ".status.total",
        description = "The number of pods in the pool."
    ),
    printcolumn(
        name = "ALLOCATED",
        type_ = "integer",
        json_path = ".status.allocated",
        description = "The number of pods allocated to BatchSandboxes."
    ),
    printcolumn(
        name = "AVAILABLE",
        type_ = "integer",
        json_path = ".status.available",
        description = "The number of idle, ready pods."
    ),
    printcolumn(
        name = "UPDATED",
        type_ = "integer",
        json_path = ".status.updated",
        description = "The number of pods on the current template revision."
    ),
    printcolumn(
        name = "BUFFER_MIN",
        type_ = "integer",
        json_path = ".spec.capacitySpec.bufferMin",
        priority = 1,
        description = "Fewest idle pods to keep."
    ),
    printcolumn(
        name = "BUFFER_MAX",
        type_ = "integer",
        json_path = ".spec.capacitySpec.bufferMax",
        priority = 1,
        description = "Most idle pods to keep."
    ),
    printcolumn(
        name = "POOL_MIN",
        type_ = "integer",
        json_path = ".spec.capacitySpec.poolMin",
        priority = 1,
        description = "Fewest pods in all."
    ),
    printcolumn(
        name = "POOL_MAX",
        type_ = "integer",
        json_path = ".spec.capacitySpec.poolMax",
        priority = 1,
        description = "Most pods in all."
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PoolSpec {
    /// Pod template of the pre-warmed pods. Changing it replaces idle pods gradually; allocated
    /// pods are never touched.
    pub template: PodTemplateSpec,

    /// Bounds on the number of pods in the pool.
    pub capacity_spec: CapacitySpec,

    /// What happens to a pod when the BatchSandbox holding it gives it back (deletion, expiry,
    /// scale-down, a finished task under `taskResourcePolicyWhenCompleted: Release`). The holder's
    /// tasks are stopped first in every case. Unset means `type: Delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle_strategy: Option<RecycleStrategy>,

    /// How fast the pool grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_strategy: Option<ScaleStrategy>,

    /// How idle pods are replaced after a template change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_strategy: Option<UpdateStrategy>,
}

/// CEL rule of a `maxUnavailable` field: a non-negative integer or a percentage from 0% to 100%.
const MAX_UNAVAILABLE_RULE: &str =
    "type(self) == int ? self >= 0 : self.matches('^(100|[1-9]?[0-9])%$')";

/// The pace of pool growth.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleStrategy {
    /// Most new pods that may be starting (created but not yet Ready) while the pool grows:
    /// creation waits until earlier pods are Ready. An absolute number (`5`) or a percentage of
    /// the pool's desired size (`"20%"`, rounded up). Default `25%`; at least 1 whatever the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": MAX_UNAVAILABLE_RULE, "message": "maxUnavailable must be a non-negative integer or a percentage from 0% to 100%"}]))]
    pub max_unavailable: Option<IntOrString>,
}

/// How pool pods are replaced when the pool's template changes. Only idle pods are replaced;
/// pods allocated to BatchSandboxes keep their template until released.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// Most idle pods out of service at once during a template rollout: an old-template pod is
    /// deleted only while fewer than this many idle pods are starting. An absolute number (`5`)
    /// or a percentage of the pool's pods (`"20%"`, rounded up). Default `25%`; at least 1
    /// whatever the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": MAX_UNAVAILABLE_RULE, "message": "maxUnavailable must be a non-negative integer or a percentage from 0% to 100%"}]))]
    pub max_unavailable: Option<IntOrString>,
}

/// Sizing bounds of a Pool. The pool keeps between `bufferMin` and `bufferMax` idle pods, and
/// between `poolMin` and `poolMax` pods in all; `poolMax` wins when they conflict.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.bufferMin <= self.bufferMax", "message": "bufferMin must be <= bufferMax"},
    {"rule": "self.poolMin <= self.poolMax", "message": "poolMin must be <= poolMax"},
]))]
pub struct CapacitySpec {
    /// Most idle (pre-warmed, unallocated) pods to keep.
    #[schemars(range(min = 0))]
    pub buffer_max: i32,
    /// Fewest idle pods to keep, so that claims are served at once.
    #[schemars(range(min = 0))]
    pub buffer_min: i32,
    /// Most pods in the pool, idle and allocated together.
    #[schemars(range(min = 0))]
    pub pool_max: i32,
    /// Fewest pods in the pool, idle and allocated together.
    #[schemars(range(min = 0))]
    pub pool_min: i32,
}

/// How pods given back by a BatchSandbox are recycled.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecycleStrategy {
    /// `Delete` (default), `Restart` or `Noop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "type")]
    pub type_: Option<RecycleType>,
}

/// `Delete` (default): delete the pod; the pool warms a fresh one. `Restart`: end every process
/// of the previous holder's tasks, confirmed by the pod's task executor, then return the pod to
/// the pool as idle; when that cannot be confirmed (no executor, unreachable, a task whose
/// processes may live on) the pod is deleted instead and a `RecycleUnconfirmed` Event says why.
/// Files the holder wrote stay. `Noop`: return the pod as is; processes that could not be
/// ended, and anything started outside tasks, may live on into the next holder. Only a Running
/// and Ready pod is ever returned; any other is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RecycleType {
    /// Delete the pod; the pool warms a fresh one.
    #[default]
    Delete,
    /// End the previous holder's task processes (confirmed), then return the pod as idle;
    /// delete it when that cannot be confirmed.
    Restart,
    /// Return the pod as is.
    Noop,
}

/// The observed state of a Pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default)]
    pub observed_generation: i64,
    /// Hash of the current pod template; pods carry it in the `sandbox.opensandbox.io/pool-revision` label.
    #[serde(default)]
    pub revision: String,
    /// Number of pods in the pool, allocated or not, excluding terminating ones.
    #[serde(default)]
    pub total: i32,
    /// Number of pods allocated to BatchSandboxes.
    #[serde(default)]
    pub allocated: i32,
    /// Number of idle pods that are Running and Ready, ready to be allocated.
    #[serde(default)]
    pub available: i32,
    /// Number of idle pods still starting.
    #[serde(default)]
    pub pending: i32,
    /// Number of pods, allocated or not, created from the current template revision.
    #[serde(default)]
    pub updated: i32,
    /// Conditions: Ready, PolicyDegraded, Terminating (what deletion waits for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// What the pool's batches read of its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Headroom {
    /// No idle Running and Ready pod: a batch the pool could not serve reports itself pending.
    pub out_of_idle: bool,
    /// Out of idle pods at `poolMax` as well: a batch short of pods waits for a release.
    pub exhausted: bool,
}

impl PoolStatus {
    pub fn headroom(&self, pool_max: i32) -> Headroom {
        let out_of_idle = self.available == 0;
        Headroom {
            out_of_idle,
            exhausted: out_of_idle && self.total >= pool_max,
        }
    }
}

impl PoolSpec {
    /// The recycle strategy's type with its default applied.
    pub fn recycle_type(&self) -> RecycleType {
        self.recycle_strategy
            .and_then(|s| s.type_)
            .unwrap_or_default()
    }

    /// `scaleStrategy.maxUnavailable` as written, if set.
    pub fn scale_max_unavailable(&self) -> Option<&IntOrString> {
        self.scale_strategy.as_ref()?.max_unavailable.as_ref()
    }

    /// `updateStrategy.maxUnavailable` as written, if set.
    pub fn update_max_unavailable(&self) -> Option<&IntOrString> {
        self.update_strategy.as_ref()?.max_unavailable.as_ref()
    }
}
