use super::*;
use proptest::prelude::*;
use serde_json::json;

fn no_policies(_: &str) -> bool {
    false
}

fn ctx() -> AdmissionContext<'static> {
    AdmissionContext {
        now: "2026-06-01T00:00:00Z".parse().unwrap(),
        max_replicas: 1000,
        policy_exists: &no_policies,
        controller_username: None,
    }
}

fn request(operation: &str, kind: Value, resource: Value, object: Value, old: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f0b2b8e-0000-4000-8000-000000000001",
            "kind": kind,
            "resource": resource,
            "name": "b",
            "namespace": "ns",
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": object,
            "oldObject": old,
            "dryRun": false,
        }
    })
}

fn batch_kind() -> (Value, Value) {
    (
        json!({"group": GROUP, "version": VERSION, "kind": "BatchSandbox"}),
        json!({"group": GROUP, "version": VERSION, "resource": "batchsandboxes"}),
    )
}

fn batch_object(spec: Value) -> Value {
    json!({"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": "b", "namespace": "ns"}, "spec": spec})
}

fn answer(body: &Value) -> AdmissionResponse {
    let reply = review(&serde_json::to_vec(body).unwrap(), &ctx());
    assert_eq!(reply.types.api_version, "admission.k8s.io/v1");
    assert_eq!(reply.types.kind, "AdmissionReview");
    assert!(reply.request.is_none());
    reply.response.expect("a response")
}

#[test]
fn a_valid_create_is_allowed_and_echoes_the_uid() {
    let (kind, resource) = batch_kind();
    let body = request(
        "CREATE",
        kind,
        resource,
        batch_object(json!({"replicas": 3, "poolRef": "fast-pool"})),
        Value::Null,
    );
    let response = answer(&body);
    assert!(response.allowed);
    assert_eq!(response.uid, "7f0b2b8e-0000-4000-8000-000000000001");
    assert!(response.warnings.is_none());
}

#[test]
fn an_invalid_create_is_denied_with_every_field_and_causes() {
    let (kind, resource) = batch_kind();
    let object = batch_object(
        json!({"replicas": 5000, "poolRef": "fast-pool", "taskTemplate": {"spec": {"process": {"command": []}}}}),
    );
    let response = answer(&request("CREATE", kind, resource, object, Value::Null));
    assert!(!response.allowed);
    assert_eq!(response.result.code, 403);
    assert!(
        response
            .result
            .message
            .starts_with("spec.replicas: 5000 must be <= 1000"),
        "{}",
        response.result.message
    );
    assert!(
        response
            .result
            .message
            .contains("; spec.taskTemplate.spec.process.command: []"),
        "{}",
        response.result.message
    );
    let causes = response.result.details.expect("details").causes;
    let fields: Vec<_> = causes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.replicas", "spec.taskTemplate.spec.process.command"]
    );
}

#[test]
fn updates_compare_with_the_old_object() {
    let (kind, resource) = batch_kind();
    let old = batch_object(json!({"poolRef": "fast-pool"}));
    let new = batch_object(json!({"poolRef": "slow-pool"}));
    let response = answer(&request(
        "UPDATE",
        kind.clone(),
        resource.clone(),
        new,
        old.clone(),
    ));
    assert!(!response.allowed);
    assert!(
        response
            .result
            .message
            .starts_with("spec.poolRef: \"slow-pool\" cannot change once set"),
        "{}",
        response.result.message
    );

    // A past expireTime that was already stored is fine on update, and rejected on create.
    let expired =
        batch_object(json!({"poolRef": "fast-pool", "expireTime": "2026-03-02T12:00:00Z"}));
    assert!(
        answer(&request(
            "UPDATE",
            kind.clone(),
            resource.clone(),
            expired.clone(),
            expired.clone()
        ))
        .allowed
    );
    let response = answer(&request("CREATE", kind, resource, expired, Value::Null));
    assert!(
        response
            .result
            .message
            .contains("spec.expireTime: \"2026-03-02T12:00:00Z\" must be in the future"),
        "{}",
        response.result.message
    );
}

#[test]
fn delete_and_connect_are_allowed() {
    let (kind, resource) = batch_kind();
    let bad = batch_object(json!({"replicas": -1}));
    assert!(
        answer(&request(
            "DELETE",
            kind.clone(),
            resource.clone(),
            Value::Null,
            bad.clone()
        ))
        .allowed
    );
    assert!(answer(&request("CONNECT", kind, resource, Value::Null, bad)).allowed);
}

#[test]
fn pools_are_validated() {
    let kind = json!({"group": GROUP, "version": VERSION, "kind": "Pool"});
    let resource = json!({"group": GROUP, "version": VERSION, "resource": "pools"});
    let pool = json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool", "metadata": {"name": "p"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                 "capacitySpec": {"bufferMax": 20, "bufferMin": 30, "poolMax": 10, "poolMin": 0}},
    });
    let response = answer(&request("CREATE", kind, resource, pool, Value::Null));
    assert_eq!(
        response.result.message,
        "spec.capacitySpec.bufferMin: 30 must be <= bufferMax (20)"
    );
}

#[test]
fn scale_requests_are_bounded() {
    let kind = json!({"group": "autoscaling", "version": "v1", "kind": "Scale"});
    let resource = json!({"group": GROUP, "version": VERSION, "resource": "batchsandboxes"});
    let scale = |n: i64| json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "b"}, "spec": {"replicas": n}});
    let mut body = request(
        "UPDATE",
        kind.clone(),
        resource.clone(),
        scale(5000),
        scale(3),
    );
    body["request"]["subResource"] = json!("scale");
    let response = answer(&body);
    assert!(!response.allowed);
    assert!(
        response
            .result
            .message
            .starts_with("spec.replicas: 5000 must be <= 1000"),
        "{}",
        response.result.message
    );
    let mut body = request("UPDATE", kind.clone(), resource, scale(7), scale(3));
    body["request"]["subResource"] = json!("scale");
    assert!(answer(&body).allowed);
    let mut body = request(
        "UPDATE",
        kind,
        json!({"group": "apps", "version": "v1", "resource": "deployments"}),
        scale(5000),
        scale(3),
    );
    body["request"]["subResource"] = json!("scale");
    assert!(
        answer(&body).allowed,
        "scales of other resources are not ours"
    );
}

#[test]
fn other_kinds_pass_with_a_warning_and_other_versions_of_ours_are_refused() {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    let response = answer(&request(
        "CREATE",
        json!({"group": "", "version": "v1", "kind": "Pod"}),
        json!({"group": "", "version": "v1", "resource": "pods"}),
        pod,
        Value::Null,
    ));
    assert!(response.allowed);
    assert_eq!(response.warnings.map(|w| w.len()), Some(1));

    let kind = json!({"group": GROUP, "version": "v1beta9", "kind": "BatchSandbox"});
    let resource = json!({"group": GROUP, "version": "v1beta9", "resource": "batchsandboxes"});
    let response = answer(&request(
        "CREATE",
        kind,
        resource,
        batch_object(json!({"poolRef": "p"})),
        Value::Null,
    ));
    assert!(!response.allowed);
    assert!(
        response.result.message.contains("v1beta9"),
        "{}",
        response.result.message
    );
}

#[test]
fn malformed_bodies_get_an_invalid_response_with_the_uid_when_there_is_one() {
    let response = answer_bytes(b"{not json");
    assert!(!response.allowed);
    assert_eq!(response.uid, "");
    assert!(
        response.result.message.contains("not JSON"),
        "{}",
        response.result.message
    );

    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "abc", "operation": "CREATE"}});
    let response = answer(&body);
    assert!(!response.allowed);
    assert_eq!(response.uid, "abc");

    let response = answer(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}));
    assert!(
        response.result.message.contains("no request"),
        "{}",
        response.result.message
    );
}

#[test]
fn an_unreadable_spec_is_denied_not_crashed_on() {
    let (kind, resource) = batch_kind();
    let response = answer(&request(
        "CREATE",
        kind,
        resource,
        batch_object(json!({"replicas": "lots"})),
        Value::Null,
    ));
    assert!(!response.allowed);
    assert!(
        response
            .result
            .message
            .starts_with("spec: <object> cannot be read as a BatchSandbox"),
        "{}",
        response.result.message
    );
}

fn answer_bytes(body: &[u8]) -> AdmissionResponse {
    review(body, &ctx()).response.expect("a response")
}

/// A reply the apiserver accepts: the right type, a response, a boolean verdict and a uid.
fn assert_well_formed(body: &[u8], expected_uid: Option<&str>) -> Result<(), TestCaseError> {
    let reply = review(body, &ctx());
    let json = serde_json::to_value(&reply).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(json["apiVersion"].as_str(), Some("admission.k8s.io/v1"));
    prop_assert_eq!(json["kind"].as_str(), Some("AdmissionReview"));
    prop_assert!(json["response"]["allowed"].is_boolean(), "{}", json);
    prop_assert!(json["response"]["uid"].is_string(), "{}", json);
    if let Some(uid) = expected_uid {
        prop_assert_eq!(json["response"]["uid"].as_str(), Some(uid));
    }
    if json["response"]["allowed"] == json!(false) {
        prop_assert!(
            !json["response"]["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "a denial says why: {}",
            json
        );
    }
    Ok(())
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,16}".prop_map(Value::from),
        prop::sample::select(vec![
            "CREATE",
            "UPDATE",
            "DELETE",
            "BatchSandbox",
            "Pool",
            "Scale",
            GROUP,
            VERSION,
            "autoscaling",
            "2026-01-01T00:00:00Z"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        let keys = prop::sample::select(vec![
            "apiVersion",
            "kind",
            "request",
            "uid",
            "group",
            "version",
            "resource",
            "operation",
            "object",
            "oldObject",
            "metadata",
            "name",
            "spec",
            "replicas",
            "poolRef",
            "template",
            "containers",
            "image",
            "taskTemplate",
            "shardTaskPatches",
            "process",
            "command",
            "env",
            "capacitySpec",
            "bufferMin",
            "expireTime",
            "subResource",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(keys, inner, 0..6).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

/// A real review skeleton with arbitrary JSON grafted in at one of its interesting places.
fn arb_review() -> impl Strategy<Value = Value> {
    let places = prop::sample::select(vec![
        "/request/object/spec",
        "/request/object",
        "/request/oldObject",
        "/request/object/metadata",
        "/request/object/spec/template",
        "/request/object/spec/taskTemplate",
        "/request/kind",
        "/request/operation",
        "/request",
    ]);
    (
        arb_json(),
        places,
        prop::sample::select(vec!["CREATE", "UPDATE"]),
        prop::bool::ANY,
    )
        .prop_map(|(graft, place, op, pool)| {
            let (kind, resource) = if pool {
                (
                    json!({"group": GROUP, "version": VERSION, "kind": "Pool"}),
                    json!({"group": GROUP, "version": VERSION, "resource": "pools"}),
                )
            } else {
                batch_kind()
            };
            let object = batch_object(json!({"replicas": 2, "poolRef": "p"}));
            let mut body = request(op, kind, resource, object.clone(), object);
            if let Some(slot) = body.pointer_mut(place) {
                *slot = graft;
            }
            body
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_get_a_well_formed_reply(body in prop::collection::vec(any::<u8>(), 0..256)) {
        assert_well_formed(&body, None)?;
    }

    #[test]
    fn arbitrary_json_gets_a_well_formed_reply(value in arb_json()) {
        assert_well_formed(&serde_json::to_vec(&value).unwrap(), None)?;
    }

    #[test]
    fn damaged_reviews_get_a_well_formed_reply_with_their_uid(body in arb_review()) {
        let uid = body.pointer("/request/uid").and_then(Value::as_str).map(str::to_owned);
        assert_well_formed(&serde_json::to_vec(&body).unwrap(), uid.as_deref())?;
    }
}

/// Only the controller may write its ledger annotations; the requester is `request.userInfo`.
#[test]
fn only_the_controller_writes_the_ledger_annotations() {
    let controller = "system:serviceaccount:opensandbox-system:sandbox-controller";
    let ctx = AdmissionContext {
        controller_username: Some(controller),
        ..ctx()
    };
    let (kind, resource) = batch_kind();
    let with_annotations = |annotations: Value| {
        let mut object = batch_object(json!({"replicas": 1, "poolRef": "fast-pool"}));
        object["metadata"]["annotations"] = annotations;
        object
    };
    let stored =
        with_annotations(json!({"sandbox.opensandbox.io/alloc-status": "{\"pods\":[\"p-1\"]}"}));
    let judge = |user: &str, object: Value, old: Value| {
        let mut body = request("UPDATE", kind.clone(), resource.clone(), object, old);
        body["request"]["userInfo"]["username"] = json!(user);
        let reply = review(&serde_json::to_vec(&body).unwrap(), &ctx);
        reply.response.expect("a response")
    };

    // A user lists another batch's pod in their own ledger: refused, naming the annotation.
    let forged = with_annotations(
        json!({"sandbox.opensandbox.io/alloc-status": "{\"pods\":[\"p-1\",\"victim-0\"]}"}),
    );
    let denied = judge("alice", forged.clone(), stored.clone());
    assert!(!denied.allowed);
    assert!(
        denied
            .result
            .message
            .contains("metadata.annotations[sandbox.opensandbox.io/alloc-status]")
            && denied
                .result
                .message
                .contains("written only by the sandbox controller"),
        "{}",
        denied.result.message
    );
    // The same change by the controller is its own business.
    assert!(judge(controller, forged, stored.clone()).allowed);
    // Corrupting or removing the ledger, or setting the release policy, is refused too.
    for object in [
        with_annotations(json!({"sandbox.opensandbox.io/alloc-status": "{"})),
        with_annotations(json!({})),
        with_annotations(
            json!({"sandbox.opensandbox.io/alloc-status": "{\"pods\":[\"p-1\"]}", "sandbox.opensandbox.io/release-policy": "Reuse"}),
        ),
    ] {
        assert!(!judge("alice", object, stored.clone()).allowed);
    }
    // Other annotations, and a release request, stay the user's.
    let release = with_annotations(json!({
        "sandbox.opensandbox.io/alloc-status": "{\"pods\":[\"p-1\"]}",
        "sandbox.opensandbox.io/alloc-release": "{\"pods\":[\"p-1\"]}",
        "team": "a",
    }));
    assert!(judge("alice", release, stored.clone()).allowed);
    // On CREATE no ledger annotation may be brought along.
    let mut create = request(
        "CREATE",
        kind.clone(),
        resource.clone(),
        with_annotations(json!({"sandbox.opensandbox.io/endpoints": "[]"})),
        Value::Null,
    );
    create["request"]["userInfo"]["username"] = json!("alice");
    let reply = review(&serde_json::to_vec(&create).unwrap(), &ctx);
    assert!(!reply.response.expect("a response").allowed);
    // An object being deleted is no exception: its ledger decides which pods are deleted.
    let mut deleting = with_annotations(
        json!({"sandbox.opensandbox.io/alloc-status": "{\"pods\":[\"victim-0\"]}"}),
    );
    deleting["metadata"]["deletionTimestamp"] = json!("2026-06-01T00:00:00Z");
    let mut old_deleting = stored;
    old_deleting["metadata"]["deletionTimestamp"] = json!("2026-06-01T00:00:00Z");
    assert!(!judge("alice", deleting, old_deleting).allowed);
}
