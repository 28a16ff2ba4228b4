//! Label, annotation and finalizer keys. The `sandbox.opensandbox.io/...` and
//! `batch-sandbox.sandbox.opensandbox.io/...` names match OpenSandbox's, so its server and tools
//! can read the objects this controller writes.

/// Annotation on a BatchSandbox: the sandboxes' addresses, in shard order.
pub const ANNOTATION_ENDPOINTS: &str = "sandbox.opensandbox.io/endpoints";
/// Annotation on a pooled BatchSandbox: which pool pods it holds, in shard order. Written only with
/// a resourceVersion precondition, so two writers can never both succeed on a stale view.
pub const ANNOTATION_ALLOC_STATUS: &str = "sandbox.opensandbox.io/alloc-status";

/// `spec.poolRef` of a BatchSandbox that asks the controller to choose a Pool whose pods fit its
/// `template`; the controller replaces it with the chosen Pool's name.
pub const ANY_POOL: &str = "*";

/// Label on every pod of a BatchSandbox (non-pooled pods) naming the batch.
pub const LABEL_BATCH_NAME: &str = "batch-sandbox.sandbox.opensandbox.io/name";
/// Label on every non-pooled pod: its shard index.
pub const LABEL_POD_INDEX: &str = "batch-sandbox.sandbox.opensandbox.io/pod-index";
/// Label on every pool pod naming its Pool.
pub const LABEL_POOL_NAME: &str = "sandbox.opensandbox.io/pool-name";
/// Label on every pool pod: the hash of the Pool template it was created from.
pub const LABEL_POOL_REVISION: &str = "sandbox.opensandbox.io/pool-revision";

/// Finalizer on a BatchSandbox: its tasks are stopped and its pods released before it goes.
pub const FINALIZER_BATCH: &str = "batch-sandbox.sandbox.opensandbox.io/task-cleanup";
/// Finalizer on a Pool: its pods are drained (idle ones at once, allocated ones when released).
pub const FINALIZER_POOL: &str = "sandbox.opensandbox.io/pool-cleanup";

/// Label on every pod this controller creates, so one label-selected watch sees exactly those.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "sandbox-controller";
/// Annotation a BatchSandbox carries once expired with action `ReturnToPool`: its pods go back to
/// the pool as idle whatever the pool's recycle policy.
pub const ANNOTATION_RELEASE_POLICY: &str = "sandbox.opensandbox.io/release-policy";
