//! AdmissionReview in, AdmissionReview out: decoding, dispatch by kind, and the response. Pure, so
//! it is tested (and fuzzed) without a server; whatever the body, the answer is a well-formed
//! review, and it carries the request's uid whenever the body has one.

use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::response::{StatusCause, StatusDetails};
use kube::core::{DynamicObject, GroupVersionKind};
use serde_json::Value;

use sandbox_domain::admission::{
    self, AdmissionContext, FieldError, Verdict, decode_batch_sandbox, decode_pool,
    validate_batch_sandbox, validate_pool,
};
use sandbox_domain::api::{GROUP, Pool, VERSION};

/// Answers one AdmissionReview request body.
pub fn review(body: &[u8], ctx: &AdmissionContext<'_>) -> AdmissionReview<DynamicObject> {
    let raw: Value = match serde_json::from_slice(body) {
        Ok(raw) => raw,
        Err(e) => return invalid(None, format!("the request body is not JSON: {e}")),
    };
    let uid = raw
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let review: AdmissionReview<DynamicObject> = match serde_json::from_value(raw) {
        Ok(review) => review,
        Err(e) => {
            return invalid(
                uid,
                format!("the request body is not an AdmissionReview: {e}"),
            );
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => return invalid(uid, "the AdmissionReview carries no request".into()),
    };
    let verdict = match request.operation {
        Operation::Create | Operation::Update => judge(&request, ctx),
        Operation::Delete | Operation::Connect => Verdict::default(),
    };
    respond(AdmissionResponse::from(&request), &request, verdict).into_review()
}

fn invalid(uid: Option<String>, message: String) -> AdmissionReview<DynamicObject> {
    let mut response = AdmissionResponse::invalid(message);
    if let Some(uid) = uid {
        response.uid = uid;
    }
    response.into_review()
}

/// Validates the object of a CREATE or UPDATE request.
fn judge(request: &AdmissionRequest<DynamicObject>, ctx: &AdmissionContext<'_>) -> Verdict {
    let kind = &request.kind;
    let is_update = matches!(request.operation, Operation::Update);
    if kind.group == "autoscaling" && kind.kind == "Scale" {
        return if request.resource.group == GROUP && request.resource.resource == "batchsandboxes" {
            judge_scale(request, is_update, ctx)
        } else {
            not_ours(kind)
        };
    }
    if kind.group != GROUP || !matches!(kind.kind.as_str(), "BatchSandbox" | "Pool") {
        return not_ours(kind);
    }
    if kind.version != VERSION {
        return failure(
            "apiVersion",
            &format!("{}/{}", kind.group, kind.version),
            format!("is not served by this webhook, which validates {GROUP}/{VERSION}"),
        );
    }
    let Some(object) = request.object.as_ref().map(to_value) else {
        return failure(
            "object",
            "<unset>",
            "must be present in a CREATE or UPDATE review".into(),
        );
    };
    let old = if is_update {
        request.old_object.as_ref().map(to_value)
    } else {
        None
    };

    match kind.kind.as_str() {
        "BatchSandbox" => {
            let requester = request.user_info.username.as_deref().unwrap_or_default();
            let owned =
                admission::controller_owned_annotations(&object, old.as_ref(), requester, ctx);
            let (new, errors) = decode_batch_sandbox(object);
            let old = old.and_then(|o| decode_batch_sandbox(o).0);
            with_decode_errors(
                errors,
                new.map(|new| {
                    // An unreadable stored object cannot be compared with: judge the update against itself.
                    let baseline = if is_update {
                        Some(old.as_ref().unwrap_or(&new))
                    } else {
                        None
                    };
                    validate_batch_sandbox(&new, baseline, ctx)
                }),
            )
            .with(owned)
        }
        _ => {
            let (new, errors) = decode_pool(object);
            let old = old.and_then(|o| decode_pool(o).0);
            with_decode_errors(
                errors,
                new.map(|new| {
                    let baseline: Option<&Pool> = if is_update {
                        Some(old.as_ref().unwrap_or(&new))
                    } else {
                        None
                    };
                    validate_pool(&new, baseline, ctx)
                }),
            )
        }
    }
}

fn judge_scale(
    request: &AdmissionRequest<DynamicObject>,
    is_update: bool,
    ctx: &AdmissionContext<'_>,
) -> Verdict {
    let replicas = |object: Option<&DynamicObject>| -> Option<i64> {
        object.map(|o| {
            o.data
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(0)
        })
    };
    let Some(new) = replicas(request.object.as_ref()) else {
        return failure(
            "object",
            "<unset>",
            "must be present in a scale review".into(),
        );
    };
    let Ok(new) = i32::try_from(new) else {
        return failure("spec.replicas", &new.to_string(), "is out of range".into());
    };
    let old = if is_update {
        replicas(request.old_object.as_ref()).and_then(|r| i32::try_from(r).ok())
    } else {
        None
    };
    admission::validate_batch_scale(new, old, ctx)
}

fn with_decode_errors(errors: Vec<FieldError>, verdict: Option<Verdict>) -> Verdict {
    let mut verdict = verdict.unwrap_or_default();
    verdict.errors.splice(0..0, errors);
    verdict
}

fn not_ours(kind: &GroupVersionKind) -> Verdict {
    // A registration wider than ours should not block objects this webhook knows nothing about.
    tracing::warn!(group = %kind.group, kind = %kind.kind, "admission request for a kind this webhook does not validate; allowed");
    Verdict {
        errors: Vec::new(),
        warnings: vec![format!(
            "the sandbox-controller webhook does not validate {} objects",
            kind.kind
        )],
    }
}

fn failure(path: &str, value: &str, reason: String) -> Verdict {
    Verdict {
        errors: vec![FieldError {
            path: path.into(),
            value: value.into(),
            rule: admission::Rule::BadRequest(reason),
        }],
        warnings: Vec::new(),
    }
}

fn to_value(object: &DynamicObject) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// Allowed: warnings only. Denied: 403 with the whole verdict as the message (what kubectl shows)
/// and one cause per field (for clients that read them).
fn respond(
    response: AdmissionResponse,
    request: &AdmissionRequest<DynamicObject>,
    verdict: Verdict,
) -> AdmissionResponse {
    let kind = &request.kind;
    let mut response = response;
    if !verdict.warnings.is_empty() {
        response.warnings = Some(verdict.warnings.clone());
    }
    if verdict.is_allowed() {
        return response;
    }
    let mut response = response.deny(verdict.message());
    response.result.code = 403;
    response.result.reason = "Forbidden".into();
    response.result.details = Some(StatusDetails {
        name: request.name.clone(),
        uid: String::new(),
        retry_after_seconds: 0,
        group: kind.group.clone(),
        kind: kind.kind.clone(),
        causes: verdict
            .errors
            .iter()
            .map(|e| StatusCause {
                reason: "FieldValueInvalid".into(),
                message: format!("{} {}", e.value, e.rule),
                field: e.path.clone(),
            })
            .collect(),
    });
    response
}

#[cfg(test)]
mod tests;
