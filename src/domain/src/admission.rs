//! Admission rules for BatchSandbox and Pool: pure functions from the submitted object (and, on
//! UPDATE, the stored one) to a [`Verdict`] that lists every failing field at once.
//!
//! The webhook server only decodes and encodes; every decision is made here, so each rule is
//! tested without a server. Messages read `<path>: <value> <rule>`, for example
//! `spec.capacitySpec.bufferMin: 30 must be <= bufferMax (20)`.
//!
//! UPDATE requests are ratcheted: an error that the stored object already had, on the same field
//! with the same value, becomes a warning. An object that became invalid under stricter settings
//! (a lower `--max-replicas`, a policy that was removed) can still get its finalizer removed, its
//! annotations written and its other fields fixed one at a time.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::alloc_release::{self, PodList};
use crate::allocation::AllocStatus;
use crate::api::{BatchSandbox, BatchSandboxSpec, EnvVar, Pool, TaskTemplateSpec, names};
use crate::pod_template;
use crate::pool_plan::MaxUnavailable;
use sandbox_decisions::tasks;

/// Replicas allowed when no other maximum is configured.
pub const DEFAULT_MAX_REPLICAS: i32 = 1000;

/// Longest value of a label; pool names and non-pooled batch names become label values on pods.
const MAX_LABEL_VALUE: usize = 63;

/// Longest rendering of a bad value in a message; longer ones are cut with an ellipsis.
const MAX_VALUE_CHARS: usize = 80;

/// Decisions a policy annotation can select, and the kind each applies to.
const POLICY_DECISIONS: &[(&str, Kind)] = &[
    ("pool-sizing", Kind::Pool),
    ("shard-tasks", Kind::BatchSandbox),
    ("expiry", Kind::BatchSandbox),
    ("pool-selection", Kind::BatchSandbox),
];

/// What the rules need besides the objects themselves.
pub struct AdmissionContext<'a> {
    /// The time "now" for `expireTime` checks.
    pub now: Timestamp,
    /// Largest `spec.replicas` a BatchSandbox may ask for.
    pub max_replicas: i32,
    /// Whether a policy of this name can be loaded.
    pub policy_exists: &'a dyn Fn(&str) -> bool,
    /// The controller's username. When set, only it may set or change the annotations in
    /// [`names::CONTROLLER_OWNED_ANNOTATIONS`]; `None` turns that check off.
    pub controller_username: Option<&'a str>,
}

/// The outcome of validating one object: allowed when `errors` is empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Every failing field, in a stable order.
    pub errors: Vec<FieldError>,
    /// Suspicious but valid settings, returned to the client as AdmissionResponse warnings.
    pub warnings: Vec<String>,
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        self.errors.is_empty()
    }

    /// All errors in one line, as `kubectl` shows it.
    pub fn message(&self) -> String {
        self.errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn error(&mut self, path: impl Into<String>, value: impl Into<String>, rule: Rule) {
        self.errors.push(FieldError {
            path: path.into(),
            value: value.into(),
            rule,
        });
    }

    fn warn(&mut self, warning: impl Into<String>) {
        self.warnings.push(warning.into());
    }

    /// This verdict and `other`'s, together.
    pub fn with(mut self, other: Verdict) -> Self {
        self.errors.extend(other.errors);
        self.warnings.extend(other.warnings);
        self
    }

    /// Ratcheting (see the module docs): errors the stored object had already become warnings.
    fn ratchet(mut self, old_errors: &[FieldError]) -> Self {
        let (kept, unchanged): (Vec<_>, Vec<_>) = self
            .errors
            .into_iter()
            .partition(|e| !old_errors.contains(e));
        self.errors = kept;
        for error in unchanged {
            self.warnings.push(format!(
                "{error} (allowed because the stored object already has this value)"
            ));
        }
        self
    }
}

/// One failing field: where it is, what it holds, and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {value} {rule}")]
pub struct FieldError {
    /// JSON path from the object root, e.g. `spec.shardTaskPatches[2].spec.process.command`.
    pub path: String,
    /// The offending value as written (strings quoted, `<unset>` when absent).
    pub value: String,
    pub rule: Rule,
}

/// The rule a field breaks; its message completes `<path>: <value> ...`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rule {
    #[error("must be >= 0")]
    Negative,
    #[error("must be <= {max} (the largest number of replicas this webhook admits)")]
    AboveMaxReplicas { max: i32 },
    #[error("must be <= {other} ({other_value})")]
    AboveOther {
        other: &'static str,
        other_value: i32,
    },
    #[error("must be > 0")]
    NotPositive,
    #[error(
        "must not name a Pool together with spec.template: set exactly one of them, or spec.poolRef \"*\" with spec.template to let the controller choose a Pool"
    )]
    BothTemplateAndPoolRef,
    #[error(
        "must be set when spec.poolRef is not: set exactly one of spec.template and spec.poolRef"
    )]
    NeitherTemplateNorPoolRef,
    #[error(
        "must be set when spec.poolRef is \"*\": the controller chooses a Pool whose pods fit it"
    )]
    PoolSelectionWithoutTemplate,
    #[error("must list at least one container")]
    NoContainers,
    #[error(
        "must be a DNS-1123 label (lower-case letters, digits and '-', starting and ending alphanumeric, at most 63 characters)"
    )]
    NotDnsLabel,
    #[error("must be unique among the pod's containers (also used by containers[{first}])")]
    DuplicateContainerName { first: usize },
    #[error("must be set: a container needs an image")]
    MissingImage,
    #[error(
        "must be a valid object name (DNS-1123 subdomain: lower-case letters, digits, '-' and '.', at most 253 characters)"
    )]
    NotObjectName,
    #[error(
        "cannot change once set (was {was}), except from \"*\" to the Pool chosen for it; create a new BatchSandbox to use another pool"
    )]
    PoolRefChanged { was: String },
    #[error(
        "cannot be set on update: the batch was created from spec.template; create a new BatchSandbox to use a pool"
    )]
    PoolRefAdded,
    #[error(
        "must be empty for a pooled batch: pool pods are created by the Pool, so there is no template to patch"
    )]
    ShardPatchesOnPooledBatch,
    #[error(
        "has {entries} entries, more than spec.replicas ({replicas}): entry i applies to shard i"
    )]
    MoreEntriesThanReplicas { entries: usize, replicas: i32 },
    #[error("is not a valid pod template patch: {reason}")]
    BadShardPatch { reason: String },
    #[error("leaves the pod of shard {shard} invalid: {problem}")]
    ShardPatchBreaksPod { shard: usize, problem: String },
    #[error(
        "must be a non-empty command whose first element names the executable, for {shards} after taskTemplate and shardTaskPatches are merged"
    )]
    EmptyCommand { shards: String },
    #[error("must consist of letters, digits, '_', '-' and '.', and must not start with a digit")]
    BadEnvName,
    #[error("must be unique in this env list (also used by env[{first}])")]
    DuplicateEnvName { first: usize },
    #[error("must be an RFC 3339 time such as \"2026-12-31T23:59:59Z\" ({reason})")]
    BadTime { reason: String },
    #[error("must be in the future when the object is created (it is now {now})")]
    ExpireTimeInPast { now: String },
    #[error("names no loadable policy")]
    UnknownPolicy,
    #[error("must be one of {allowed}")]
    NotOneOf { allowed: &'static str },
    #[error("must be at most 63 characters: it becomes the value of label {label} on every pod")]
    NameTooLongForLabel { label: &'static str },
    #[error("cannot be read as a {kind}: {reason}")]
    Unreadable { kind: &'static str, reason: String },
    #[error(
        "must be a non-negative integer (5) or a percentage from \"0%\" to \"100%\" (\"25%\"): {problem}"
    )]
    BadMaxUnavailable { problem: String },
    #[error(
        "is not supported: this controller cannot pause or resume sandboxes (it takes no image snapshots); leave spec.pause unset or false"
    )]
    PauseUnsupported,
    #[error("must be JSON of the form {{\"pods\": [\"<pod>\", ...]}} ({reason})")]
    BadPodList { reason: String },
    #[error(
        "lists pod(s) {pods} that this BatchSandbox does not hold (its sandbox.opensandbox.io/alloc-status annotation lists the pods it may release)"
    )]
    ReleasesForeignPods { pods: String },
    #[error(
        "is written only by the sandbox controller ({controller}); it records the pods the batch holds and releases, so no other user may set, change or remove it"
    )]
    ControllerOwned { controller: String },
    /// A problem with the review request itself rather than with a field of the object.
    #[error("{0}")]
    BadRequest(String),
}

impl Rule {
    /// One instance of every rule, with sample values: the message table of docs/admission.md.
    pub fn catalogue() -> Vec<Rule> {
        vec![
            Rule::Negative,
            Rule::AboveMaxReplicas { max: 1000 },
            Rule::AboveOther {
                other: "bufferMax",
                other_value: 20,
            },
            Rule::NotPositive,
            Rule::BothTemplateAndPoolRef,
            Rule::NeitherTemplateNorPoolRef,
            Rule::PoolSelectionWithoutTemplate,
            Rule::NoContainers,
            Rule::NotDnsLabel,
            Rule::DuplicateContainerName { first: 0 },
            Rule::MissingImage,
            Rule::NotObjectName,
            Rule::PoolRefChanged {
                was: "\"fast-pool\"".into(),
            },
            Rule::PoolRefAdded,
            Rule::ShardPatchesOnPooledBatch,
            Rule::MoreEntriesThanReplicas {
                entries: 3,
                replicas: 2,
            },
            Rule::BadShardPatch {
                reason: "expected an object".into(),
            },
            Rule::ShardPatchBreaksPod {
                shard: 1,
                problem: "spec.containers[0].image: must be set".into(),
            },
            Rule::EmptyCommand {
                shards: "shards 0-2".into(),
            },
            Rule::BadEnvName,
            Rule::DuplicateEnvName { first: 0 },
            Rule::BadTime {
                reason: "invalid date".into(),
            },
            Rule::ExpireTimeInPast {
                now: "2026-12-01T00:00:00Z".into(),
            },
            Rule::UnknownPolicy,
            Rule::NameTooLongForLabel {
                label: names::LABEL_BATCH_NAME,
            },
            Rule::Unreadable {
                kind: "BatchSandbox",
                reason: "spec.replicas: invalid type".into(),
            },
            Rule::BadMaxUnavailable {
                problem: "must be a percentage from 0% to 100%".into(),
            },
            Rule::PauseUnsupported,
            Rule::BadPodList {
                reason: "expected value at line 1 column 1".into(),
            },
            Rule::ReleasesForeignPods {
                pods: "\"other-pool-x7k2p\"".into(),
            },
            Rule::BadRequest("the request has no object".into()),
            Rule::ControllerOwned {
                controller: "system:serviceaccount:opensandbox-system:sandbox-controller".into(),
            },
            Rule::NotOneOf {
                allowed: RECYCLE_TYPES,
            },
        ]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    BatchSandbox,
    Pool,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::BatchSandbox => "BatchSandbox",
            Kind::Pool => "Pool",
        })
    }
}

// ------------------------------------------------------------------ decoding --

/// Reads a BatchSandbox from its JSON form. Problems that the typed form cannot even hold (an
/// `expireTime` that is no time, a spec of the wrong shape) come back as field errors, so that they
/// are reported together with the rule violations instead of hiding them.
pub fn decode_batch_sandbox(object: Value) -> (Option<BatchSandbox>, Vec<FieldError>) {
    let mut object = object;
    let mut errors = Vec::new();
    if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut)
        && let Some(raw) = spec.get("expireTime")
        && !raw.is_null()
    {
        let parsed = raw.as_str().map(|s| s.parse::<Timestamp>());
        match parsed {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                errors.push(bad_time(raw, e.to_string()));
                spec.remove("expireTime");
            }
            None => {
                errors.push(bad_time(raw, "not a string".into()));
                spec.remove("expireTime");
            }
        }
    }
    match serde_json::from_value::<BatchSandbox>(object) {
        Ok(batch) => (Some(batch), errors),
        Err(e) => {
            errors.push(unreadable(Kind::BatchSandbox, &e));
            (None, errors)
        }
    }
}

/// Reads a Pool from its JSON form; see [`decode_batch_sandbox`]. An unknown
/// `spec.recycleStrategy.type` is reported by name (with the values allowed) and left out, so
/// the rest of the object is still checked.
pub fn decode_pool(object: Value) -> (Option<Pool>, Vec<FieldError>) {
    let mut object = object;
    let mut errors = Vec::new();
    if let Some(strategy) = object
        .pointer_mut("/spec/recycleStrategy")
        .and_then(Value::as_object_mut)
        && let Some(raw) = strategy.get("type")
        && !raw.is_null()
        && !raw
            .as_str()
            .is_some_and(|t| RECYCLE_TYPES.split(", ").any(|allowed| allowed == t))
    {
        errors.push(FieldError {
            path: "spec.recycleStrategy.type".into(),
            value: render_json(raw),
            rule: Rule::NotOneOf {
                allowed: RECYCLE_TYPES,
            },
        });
        strategy.remove("type");
    }
    match serde_json::from_value::<Pool>(object) {
        Ok(pool) => (Some(pool), errors),
        Err(e) => {
            errors.push(unreadable(Kind::Pool, &e));
            (None, errors)
        }
    }
}

/// The values of `spec.recycleStrategy.type`, as the CRD's enum lists them.
const RECYCLE_TYPES: &str = "Delete, Restart, Noop";

fn bad_time(raw: &Value, reason: String) -> FieldError {
    FieldError {
        path: "spec.expireTime".into(),
        value: render_json(raw),
        rule: Rule::BadTime { reason },
    }
}

fn unreadable(kind: Kind, error: &serde_json::Error) -> FieldError {
    let kind = match kind {
        Kind::BatchSandbox => "BatchSandbox",
        Kind::Pool => "Pool",
    };
    FieldError {
        path: "spec".into(),
        value: "<object>".into(),
        rule: Rule::Unreadable {
            kind,
            reason: error.to_string(),
        },
    }
}

// ------------------------------------------------------------- BatchSandbox --

/// The controller's ledger annotations ([`names::CONTROLLER_OWNED_ANNOTATIONS`]) may be set,
/// changed or removed by the controller alone. `new` and `old` are the submitted and stored
/// objects as JSON (`old` is `None` on CREATE); `requester` is `request.userInfo.username`.
/// Applies to objects being deleted too: a forged ledger there would have other pods deleted.
pub fn controller_owned_annotations(
    new: &Value,
    old: Option<&Value>,
    requester: &str,
    ctx: &AdmissionContext<'_>,
) -> Verdict {
    let mut verdict = Verdict::default();
    let Some(controller) = ctx.controller_username else {
        return verdict;
    };
    if requester == controller {
        return verdict;
    }
    let annotation = |object: Option<&Value>, key: &str| {
        object
            .and_then(|o| o.pointer("/metadata/annotations"))
            .and_then(|a| a.get(key))
            .cloned()
    };
    for key in names::CONTROLLER_OWNED_ANNOTATIONS {
        let submitted = annotation(Some(new), key);
        if submitted != annotation(old, key) {
            let value = match &submitted {
                Some(Value::String(text)) => quote(text),
                Some(other) => render_json(other),
                None => "<unset>".into(),
            };
            verdict.error(
                format!("metadata.annotations[{key}]"),
                value,
                Rule::ControllerOwned {
                    controller: controller.to_string(),
                },
            );
        }
    }
    verdict
}

/// Validates a BatchSandbox on CREATE (`old == None`) or UPDATE (`old` is the stored object).
pub fn validate_batch_sandbox(
    new: &BatchSandbox,
    old: Option<&BatchSandbox>,
    ctx: &AdmissionContext<'_>,
) -> Verdict {
    if is_being_deleted(&new.metadata) {
        // Only finalizers and metadata change from here on; blocking them would strand the object.
        return Verdict::default();
    }
    let mut verdict = Verdict::default();
    batch_rules(new, old, ctx, &mut verdict);
    if let Some(old) = old {
        let chosen_for_selection = old.awaits_pool_selection() && new.pool_name().is_some();
        if old.spec.pool_ref != new.spec.pool_ref && !chosen_for_selection {
            let value = render_opt_str(new.spec.pool_ref.as_deref());
            let rule = match &old.spec.pool_ref {
                Some(was) => Rule::PoolRefChanged { was: quote(was) },
                None => Rule::PoolRefAdded,
            };
            verdict.error("spec.poolRef", value, rule);
        }
        let mut stale = Verdict::default();
        batch_rules(old, Some(old), ctx, &mut stale);
        verdict = verdict.ratchet(&stale.errors);
    }
    verdict
}

/// Validates `spec.replicas` set through the scale subresource (`kubectl scale`). The request
/// carries only a Scale object, so only the replica bounds can be checked here; leaving the count
/// as it was is always allowed.
pub fn validate_batch_scale(
    replicas: i32,
    old_replicas: Option<i32>,
    ctx: &AdmissionContext<'_>,
) -> Verdict {
    let mut verdict = Verdict::default();
    if old_replicas == Some(replicas) {
        return verdict;
    }
    if replicas < 0 {
        verdict.error("spec.replicas", replicas.to_string(), Rule::Negative);
    } else if replicas > ctx.max_replicas {
        verdict.error(
            "spec.replicas",
            replicas.to_string(),
            Rule::AboveMaxReplicas {
                max: ctx.max_replicas,
            },
        );
    }
    verdict
}

/// The rules that look at one object (plus, for the patch-length rule, whether the lists changed).
fn batch_rules(
    batch: &BatchSandbox,
    old: Option<&BatchSandbox>,
    ctx: &AdmissionContext<'_>,
    verdict: &mut Verdict,
) {
    let spec = &batch.spec;
    policy_annotations(&batch.metadata, Kind::BatchSandbox, ctx, verdict);

    if spec.replicas < 0 {
        verdict.error("spec.replicas", spec.replicas.to_string(), Rule::Negative);
    } else if spec.replicas > ctx.max_replicas {
        verdict.error(
            "spec.replicas",
            spec.replicas.to_string(),
            Rule::AboveMaxReplicas {
                max: ctx.max_replicas,
            },
        );
    }

    match (&spec.template, spec.pool_ref.as_deref()) {
        (None, Some(names::ANY_POOL)) => verdict.error(
            "spec.template",
            "<unset>",
            Rule::PoolSelectionWithoutTemplate,
        ),
        (Some(_), Some(pool))
            if pool != names::ANY_POOL && !pool_chosen_for_selection(old, pool) =>
        {
            verdict.error("spec.poolRef", quote(pool), Rule::BothTemplateAndPoolRef)
        }
        (None, None) => verdict.error("spec.template", "<unset>", Rule::NeitherTemplateNorPoolRef),
        _ => {}
    }
    if let Some(pool) = &spec.pool_ref
        && pool != names::ANY_POOL
        && !is_dns_subdomain(pool)
    {
        verdict.error("spec.poolRef", quote(pool), Rule::NotObjectName);
    }
    if let Some(template) = &spec.template {
        pod_template_rules("spec.template", template, verdict);
        if spec.pool_ref.is_none() {
            name_fits_label(&batch.metadata, names::LABEL_BATCH_NAME, verdict);
        }
    }

    if spec.pool_ref.is_some() && !spec.shard_patches.is_empty() {
        verdict.error(
            "spec.shardPatches",
            format!("[{} entries]", spec.shard_patches.len()),
            Rule::ShardPatchesOnPooledBatch,
        );
    } else if let Some(template) = &spec.template {
        shard_patch_rules(batch, template, verdict);
    }

    let old_spec = old.map(|o| &o.spec);
    patch_count_rule(
        "spec.shardPatches",
        spec.shard_patches.len(),
        spec.replicas,
        old_spec.map(|o| o.shard_patches == spec.shard_patches),
        verdict,
    );
    patch_count_rule(
        "spec.shardTaskPatches",
        spec.shard_task_patches.len(),
        spec.replicas,
        old_spec.map(|o| o.shard_task_patches == spec.shard_task_patches),
        verdict,
    );

    if let Some(template) = &spec.task_template {
        task_fields("spec.taskTemplate", template, verdict);
    }
    for (i, patch) in spec.shard_task_patches.iter().enumerate() {
        task_fields(&format!("spec.shardTaskPatches[{i}]"), patch, verdict);
    }
    shard_command_rule(spec, ctx, verdict);

    if spec.pause == Some(true) {
        verdict.error("spec.pause", "true", Rule::PauseUnsupported);
    }
    alloc_release_rule(batch, old, verdict);

    if let Some(expire) = &spec.expire_time {
        let unchanged = old_spec.is_some_and(|o| o.expire_time.as_ref() == Some(expire));
        if expire.0 <= ctx.now && !unchanged {
            if old.is_none() {
                verdict.error(
                    "spec.expireTime",
                    quote(&rfc3339(expire.0)),
                    Rule::ExpireTimeInPast {
                        now: rfc3339(ctx.now),
                    },
                );
            } else {
                verdict.warn(format!(
                    "spec.expireTime: {} is in the past: the batch expires at once",
                    quote(&rfc3339(expire.0))
                ));
            }
        }
    }
}

/// Whether a named `poolRef` beside a template is the Pool the controller chose for `poolRef: "*"`:
/// the stored object had the template and `"*"` (the choice being written) or this same name (a
/// later update of a batch whose Pool was chosen).
fn pool_chosen_for_selection(old: Option<&BatchSandbox>, pool: &str) -> bool {
    old.is_some_and(|old| {
        old.spec.template.is_some()
            && matches!(old.spec.pool_ref.as_deref(), Some(was) if was == names::ANY_POOL || was == pool)
    })
}

/// `alloc-release` may name only pods the batch holds (or has already released). Checked when the
/// annotation is written or changed, so that the controller's own later writes (which shrink the
/// ledger) never trip over a request already carried out.
fn alloc_release_rule(batch: &BatchSandbox, old: Option<&BatchSandbox>, verdict: &mut Verdict) {
    let annotation = |b: &BatchSandbox, key: &str| {
        b.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .cloned()
    };
    let Some(request) = annotation(batch, names::ANNOTATION_ALLOC_RELEASE) else {
        return;
    };
    if old
        .is_some_and(|o| annotation(o, names::ANNOTATION_ALLOC_RELEASE).as_ref() == Some(&request))
    {
        return;
    }
    let path = format!("metadata.annotations[{}]", names::ANNOTATION_ALLOC_RELEASE);
    let requested = match PodList::parse(Some(&request)) {
        Ok(list) => list,
        Err(e) => {
            verdict.error(
                path,
                quote(&request),
                Rule::BadPodList {
                    reason: e.to_string(),
                },
            );
            return;
        }
    };
    // An unreadable ledger is the controller's problem to report; nothing can be checked here.
    let Ok(ledger) = AllocStatus::of(batch) else {
        return;
    };
    let released = PodList::parse(annotation(batch, names::ANNOTATION_ALLOC_RELEASED).as_deref())
        .unwrap_or_default();
    let foreign = alloc_release::foreign_pods(&requested.pods, &ledger.pods, &released.pods);
    if !foreign.is_empty() {
        let pods = foreign
            .iter()
            .map(|p| quote(p))
            .collect::<Vec<_>>()
            .join(", ");
        verdict.error(path, quote(&request), Rule::ReleasesForeignPods { pods });
    }
}

/// `shardPatches`/`shardTaskPatches` must not outnumber the shards. Scaling down below the number
/// of patches leaves the lists untouched, so an UPDATE that only lowers `replicas` is allowed with a
/// warning: the extra entries apply again when the batch scales back up.
fn patch_count_rule(
    path: &str,
    entries: usize,
    replicas: i32,
    unchanged: Option<bool>,
    verdict: &mut Verdict,
) {
    let shards = usize::try_from(replicas).unwrap_or(0);
    if entries <= shards {
        return;
    }
    if unchanged == Some(true) {
        verdict.warn(format!(
            "{path} has {entries} entries but spec.replicas is {replicas}: entries from index {shards} on apply only when the batch scales up again"
        ));
    } else {
        verdict.error(
            path,
            format!("[{entries} entries]"),
            Rule::MoreEntriesThanReplicas { entries, replicas },
        );
    }
}

/// Applies each `shardPatches[i]` to the template exactly as the controller will, and checks that
/// the patch parses and the shard's pod still has valid containers.
fn shard_patch_rules(batch: &BatchSandbox, template: &PodTemplateSpec, verdict: &mut Verdict) {
    let name = batch.metadata.name.as_deref().unwrap_or("batch");
    // Problems the template already has are reported on the template itself, not on each patch.
    let mut own = Verdict::default();
    pod_template_rules("spec.template", template, &mut own);
    for (i, patch) in batch.spec.shard_patches.iter().enumerate() {
        let path = format!("spec.shardPatches[{i}]");
        if !patch.is_object() {
            verdict.error(
                path,
                render_json(patch),
                Rule::BadShardPatch {
                    reason: "must be an object".into(),
                },
            );
            continue;
        }
        match pod_template::batch_pod(name, i, template, Some(patch), OwnerReference::default()) {
            Err(e) => verdict.error(
                path,
                render_json(patch),
                Rule::BadShardPatch {
                    reason: e.source.to_string(),
                },
            ),
            Ok(pod) => {
                let merged = PodTemplateSpec {
                    metadata: None,
                    spec: pod.spec,
                };
                let mut scratch = Verdict::default();
                pod_template_rules("spec.template", &merged, &mut scratch);
                for problem in scratch
                    .errors
                    .into_iter()
                    .filter(|e| !own.errors.contains(e))
                {
                    verdict.error(
                        path.clone(),
                        render_json(patch),
                        Rule::ShardPatchBreaksPod {
                            shard: i,
                            problem: problem.to_string(),
                        },
                    );
                }
            }
        }
    }
}

/// Field rules inside one task template or patch: env names and the timeout.
fn task_fields(path: &str, task: &TaskTemplateSpec, verdict: &mut Verdict) {
    let Some(spec) = &task.spec else { return };
    if let Some(timeout) = spec.timeout_seconds
        && timeout <= 0
    {
        verdict.error(
            format!("{path}.spec.timeoutSeconds"),
            timeout.to_string(),
            Rule::NotPositive,
        );
    }
    if let Some(env) = spec.process.as_ref().and_then(|p| p.env.as_ref()) {
        env_rules(&format!("{path}.spec.process.env"), env, verdict);
    }
}

fn env_rules(path: &str, env: &[EnvVar], verdict: &mut Verdict) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, var) in env.iter().enumerate() {
        let field = format!("{path}[{i}].name");
        if !is_env_name(&var.name) {
            verdict.error(field, quote(&var.name), Rule::BadEnvName);
        } else if let Some(&first) = seen.get(var.name.as_str()) {
            verdict.error(field, quote(&var.name), Rule::DuplicateEnvName { first });
        } else {
            seen.insert(&var.name, i);
        }
    }
}

/// Every shard that has a task must end up with a command. Shards with neither a template nor a
/// patch have no task, which is fine. The merge is `sandbox_decisions::tasks`, the one the controller runs;
/// shards past the last patch all get the bare template, so one representative stands for them
/// all and the cost does not grow with `replicas`.
fn shard_command_rule(spec: &BatchSandboxSpec, ctx: &AdmissionContext<'_>, verdict: &mut Verdict) {
    let shards = usize::try_from(spec.replicas.clamp(0, ctx.max_replicas.max(0))).unwrap_or(0);
    let patches = &spec.shard_task_patches;
    let template = spec.task_template.as_ref();
    let patched = shards.min(patches.len());
    let mut template_shards: Vec<usize> = Vec::new();

    for (index, task) in tasks::shard_tasks(patched, template, patches)
        .into_iter()
        .enumerate()
    {
        let Some(task) = task else { continue };
        let command = task.process.as_ref().and_then(|p| p.command.as_ref());
        if is_runnable(command) {
            continue;
        }
        let patch_has_spec = patches.get(index).is_some_and(|p| p.spec.is_some());
        if patch_has_spec {
            verdict.error(
                format!("spec.shardTaskPatches[{index}].spec.process.command"),
                render_command(command),
                Rule::EmptyCommand {
                    shards: format!("shard {index}"),
                },
            );
        } else {
            template_shards.push(index);
        }
    }

    let bare = tasks::shard_task(template, None);
    let bare_command = bare
        .as_ref()
        .and_then(|t| t.process.as_ref())
        .and_then(|p| p.command.as_ref());
    if bare.is_some() && !is_runnable(bare_command) {
        template_shards.extend(patched..shards);
        if !template_shards.is_empty() {
            verdict.error(
                "spec.taskTemplate.spec.process.command",
                render_command(bare_command),
                Rule::EmptyCommand {
                    shards: shard_list(&template_shards),
                },
            );
        } else {
            verdict.warn(format!(
                "spec.taskTemplate.spec.process.command is {}: no current shard runs the template alone, but shards from index {} on would, without a command, if the batch scaled up",
                render_command(bare_command),
                patches.len()
            ));
        }
    }
}

fn is_runnable(command: Option<&Vec<String>>) -> bool {
    command
        .and_then(|c| c.first())
        .is_some_and(|executable| !executable.trim().is_empty())
}

// --------------------------------------------------------------------- Pool --

/// Validates a Pool on CREATE (`old == None`) or UPDATE.
pub fn validate_pool(new: &Pool, old: Option<&Pool>, ctx: &AdmissionContext<'_>) -> Verdict {
    if is_being_deleted(&new.metadata) {
        return Verdict::default();
    }
    let mut verdict = Verdict::default();
    pool_rules(new, ctx, &mut verdict);
    if let Some(old) = old {
        let mut stale = Verdict::default();
        pool_rules(old, ctx, &mut stale);
        verdict = verdict.ratchet(&stale.errors);
    }
    verdict
}

fn pool_rules(pool: &Pool, ctx: &AdmissionContext<'_>, verdict: &mut Verdict) {
    policy_annotations(&pool.metadata, Kind::Pool, ctx, verdict);
    name_fits_label(&pool.metadata, names::LABEL_POOL_NAME, verdict);
    pod_template_rules("spec.template", &pool.spec.template, verdict);

    let strategies = [
        (
            "spec.scaleStrategy.maxUnavailable",
            pool.spec.scale_max_unavailable(),
        ),
        (
            "spec.updateStrategy.maxUnavailable",
            pool.spec.update_max_unavailable(),
        ),
    ];
    for (path, value) in strategies {
        if let Some(value) = value
            && let Err(problem) = MaxUnavailable::parse(value)
        {
            let rendered = serde_json::to_value(value).unwrap_or(Value::Null);
            verdict.error(
                path,
                render_json(&rendered),
                Rule::BadMaxUnavailable {
                    problem: problem.to_string(),
                },
            );
        }
    }

    let c = &pool.spec.capacity_spec;
    let fields = [
        ("bufferMax", c.buffer_max),
        ("bufferMin", c.buffer_min),
        ("poolMax", c.pool_max),
        ("poolMin", c.pool_min),
    ];
    for (name, value) in fields {
        if value < 0 {
            verdict.error(
                format!("spec.capacitySpec.{name}"),
                value.to_string(),
                Rule::Negative,
            );
        }
    }
    if c.buffer_min > c.buffer_max {
        verdict.error(
            "spec.capacitySpec.bufferMin",
            c.buffer_min.to_string(),
            Rule::AboveOther {
                other: "bufferMax",
                other_value: c.buffer_max,
            },
        );
    }
    if c.pool_min > c.pool_max {
        verdict.error(
            "spec.capacitySpec.poolMin",
            c.pool_min.to_string(),
            Rule::AboveOther {
                other: "poolMax",
                other_value: c.pool_max,
            },
        );
    }

    if c.pool_max == 0 {
        verdict.warn("spec.capacitySpec.poolMax is 0: the pool can never hold a pod, so batches that reference it wait forever");
    } else if c.buffer_min > c.pool_max {
        verdict.warn(format!(
            "spec.capacitySpec.bufferMin ({}) > poolMax ({}): the buffer can never be filled; the pool stops at poolMax",
            c.buffer_min, c.pool_max
        ));
    } else if c.buffer_max > c.pool_max {
        verdict.warn(format!(
            "spec.capacitySpec.bufferMax ({}) > poolMax ({}): at most poolMax pods exist, so the buffer never exceeds {}",
            c.buffer_max, c.pool_max, c.pool_max
        ));
    }
    if c.pool_min > 0 && c.pool_min <= c.pool_max && c.buffer_max == 0 && c.buffer_min == 0 {
        // Valid, but worth saying: nothing is ever kept warm beyond poolMin.
        verdict.warn("spec.capacitySpec.bufferMax is 0: no idle pods are kept beyond poolMin, so claims past it wait for new pods");
    }
}

// ------------------------------------------------------------------- shared --

fn is_being_deleted(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

/// Containers of a pod template: at least one, each with a DNS-label name (unique) and an image.
fn pod_template_rules(path: &str, template: &PodTemplateSpec, verdict: &mut Verdict) {
    let containers = template
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    if containers.is_empty() {
        let value = if template.spec.is_some() {
            "[]"
        } else {
            "<unset>"
        };
        verdict.error(format!("{path}.spec.containers"), value, Rule::NoContainers);
        return;
    }
    reserved_executor_name(path, template, verdict);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, container) in containers.iter().enumerate() {
        let base = format!("{path}.spec.containers[{i}]");
        if !is_dns_label(&container.name) {
            verdict.error(
                format!("{base}.name"),
                quote(&container.name),
                Rule::NotDnsLabel,
            );
        } else if let Some(&first) = seen.get(container.name.as_str()) {
            verdict.error(
                format!("{base}.name"),
                quote(&container.name),
                Rule::DuplicateContainerName { first },
            );
        } else {
            seen.insert(&container.name, i);
        }
        if container
            .image
            .as_deref()
            .is_none_or(|image| image.trim().is_empty())
        {
            verdict.error(
                format!("{base}.image"),
                render_opt_str(container.image.as_deref()),
                Rule::MissingImage,
            );
        }
    }
}

/// The executor's container name is the controller's: a template container of that name is
/// replaced wherever the controller injects its executor, and never sent a request anywhere.
fn reserved_executor_name(path: &str, template: &PodTemplateSpec, verdict: &mut Verdict) {
    let Some(spec) = template.spec.as_ref() else {
        return;
    };
    let name = names::EXECUTOR_CONTAINER_NAME;
    let containers = spec.containers.iter().map(|c| ("containers", c));
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| ("initContainers", c));
    for (list, _) in containers.chain(init).filter(|(_, c)| c.name == name) {
        verdict.warn(format!(
            "{path}.spec.{list}: the name {name:?} is reserved: where the controller injects its task executor it replaces this container, and it never sends tasks to a {name} it did not inject"
        ));
    }
}

fn name_fits_label(meta: &ObjectMeta, label: &'static str, verdict: &mut Verdict) {
    if let Some(name) = &meta.name
        && name.len() > MAX_LABEL_VALUE
    {
        verdict.error(
            "metadata.name",
            quote(name),
            Rule::NameTooLongForLabel { label },
        );
    }
}

/// Annotations `policy.sandbox.opensandbox.io/<decision>: <name>` must name a loadable policy.
/// A decision this kind does not make is only a warning: the annotation has no effect.
fn policy_annotations(
    meta: &ObjectMeta,
    kind: Kind,
    ctx: &AdmissionContext<'_>,
    verdict: &mut Verdict,
) {
    let Some(annotations) = &meta.annotations else {
        return;
    };
    for (key, name) in annotations {
        let Some(decision) = key.strip_prefix(crate::api::names::ANNOTATION_POLICY_PREFIX) else {
            continue;
        };
        match POLICY_DECISIONS.iter().find(|(d, _)| *d == decision) {
            None => {
                let known: Vec<_> = POLICY_DECISIONS.iter().map(|(d, _)| *d).collect();
                verdict.warn(format!(
                    "metadata.annotations[{key}]: unknown decision {}; known decisions are {}",
                    quote(decision),
                    known.join(", ")
                ));
                continue;
            }
            Some((_, applies_to)) if *applies_to != kind => {
                verdict.warn(format!("metadata.annotations[{key}]: a {kind} makes no {decision} decision, so this annotation has no effect"));
                continue;
            }
            Some(_) => {}
        }
        if !(ctx.policy_exists)(name) {
            verdict.error(
                format!("metadata.annotations[{key}]"),
                quote(name),
                Rule::UnknownPolicy,
            );
        }
    }
}

/// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// RFC 1123 subdomain (the rule for most object names): dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Environment variable names as Kubernetes accepts them: `[-._a-zA-Z][-._a-zA-Z0-9]*`.
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    chars.next().is_some_and(|c| ok(c) && !c.is_ascii_digit()) && chars.all(ok)
}

/// `0-2, 5, 7-9`; long lists are cut after a few ranges.
fn shard_list(shards: &[usize]) -> String {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &s in shards {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => ranges.push((s, s)),
        }
    }
    let noun = if shards.len() == 1 { "shard" } else { "shards" };
    let shown: Vec<String> = ranges
        .iter()
        .take(8)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    let more = if ranges.len() > 8 { ", ..." } else { "" };
    format!("{noun} {}{more}", shown.join(", "))
}

/// RFC 3339 in UTC to the second, as Kubernetes writes times.
fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn quote(s: &str) -> String {
    truncate(serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}")))
}

fn render_opt_str(s: Option<&str>) -> String {
    s.map_or_else(|| "<unset>".to_string(), quote)
}

fn render_command(command: Option<&Vec<String>>) -> String {
    command.map_or_else(
        || "<unset>".to_string(),
        |c| truncate(serde_json::to_string(c).unwrap_or_default()),
    )
}

fn render_json(value: &Value) -> String {
    truncate(value.to_string())
}

fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_VALUE_CHARS {
        s = s.chars().take(MAX_VALUE_CHARS).collect();
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests;
