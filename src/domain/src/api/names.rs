//! Label, annotation and finalizer keys. The `sandbox.opensandbox.io/...` and
//! `batch-sandbox.sandbox.opensandbox.io/...` names match OpenSandbox's, so its server and tools
//! can read the objects this controller writes.

/// Annotation on a BatchSandbox: the sandboxes' addresses, in shard order.
pub const ANNOTATION_ENDPOINTS: &str = "sandbox.opensandbox.io/endpoints";
/// Annotation on a pooled BatchSandbox: which pool pods it holds, in shard order. Written only with
/// a resourceVersion precondition, so two writers can never both succeed on a stale view.
pub const ANNOTATION_ALLOC_STATUS: &str = "sandbox.opensandbox.io/alloc-status";
/// Annotation on a pool pod: which controller process made it (a token drawn at each start).
/// A pod a process made can only have been granted by that process, which is how it tells them
/// from older ones when a ledger it never read may hold those.
pub const ANNOTATION_POD_MAKER: &str = "sandbox.opensandbox.io/made-by";

/// Annotation prefix that selects a custom WebAssembly policy for one decision of one object,
/// e.g. `policy.sandbox.opensandbox.io/pool-sizing: demand-aware`.
pub const ANNOTATION_POLICY_PREFIX: &str = "policy.sandbox.opensandbox.io/";

/// Name of the task executor's container (or native sidecar) in a pod. Reserved: where the
/// controller injects its executor it replaces a container of this name, and it sends tasks to
/// no such container it did not inject.
pub const EXECUTOR_CONTAINER_NAME: &str = "task-executor";

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
/// Annotation on a BatchSandbox: the outcome of each released shard's task.
pub const ANNOTATION_TASK_RESULTS: &str = "sandbox.opensandbox.io/task-results";

/// Label an operator sets (any value) on a pool pod to take it out of service: an idle pod is
/// deleted at once and replaced, and never allocated again; an allocated pod stays with its
/// BatchSandbox and is deleted once released, whatever the pool's recycle strategy.
pub const LABEL_EVICT: &str = "pool.opensandbox.io/evict";

/// Annotation on a pooled BatchSandbox, **written by users and tools** (never by this
/// controller): `{"pods": ["<pod>", ...]}` asks to release those pods of the batch now. Their
/// shards are scaled in: tasks stopped, pods recycled per the pool's recycle strategy, and the
/// shards never get a pod again.
pub const ANNOTATION_ALLOC_RELEASE: &str = "sandbox.opensandbox.io/alloc-release";
/// Annotation on a pooled BatchSandbox, written by this controller: `{"pods": ["<pod>", ...]}`,
/// the pods released on request through [`ANNOTATION_ALLOC_RELEASE`] whose release is done.
pub const ANNOTATION_ALLOC_RELEASED: &str = "sandbox.opensandbox.io/alloc-released";

/// Annotations in the `sandbox.opensandbox.io/` namespace that users and tools write by design.
/// Every other annotation this controller reads under that prefix is its own bookkeeping.
pub const USER_WRITABLE_ANNOTATIONS: &[&str] = &[ANNOTATION_ALLOC_RELEASE];

/// Annotations only the controller may set or change: they record what it handed out and what it
/// must give back. The admission webhook refuses any other requester's change to them (users
/// request a release through [`ANNOTATION_ALLOC_RELEASE`], which stays theirs).
pub const CONTROLLER_OWNED_ANNOTATIONS: &[&str] = &[
    ANNOTATION_ALLOC_STATUS,
    ANNOTATION_ALLOC_RELEASED,
    ANNOTATION_ENDPOINTS,
    ANNOTATION_TASK_RESULTS,
];
