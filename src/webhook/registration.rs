//! The ValidatingWebhookConfiguration that sends BatchSandbox and Pool writes to this webhook.
//!
//! Built by a pure function (tested below), then server-side applied, so re-registering with a
//! new port or CA is one idempotent call. A configuration can be scoped to one namespace, which
//! lets parallel tests each run their own webhook under their own configuration name.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, RuleWithOperations, ServiceReference, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use sandbox_domain::api::{GROUP, VERSION, names};

/// The webhook's name inside the configuration; kubectl prints it in every denial.
pub const WEBHOOK_NAME: &str = "validate.sandbox.opensandbox.io";
/// Path the server answers AdmissionReviews on.
pub const VALIDATE_PATH: &str = "/validate";
/// Configuration name when none is given and the webhook is not scoped to a namespace.
pub const DEFAULT_CONFIGURATION_NAME: &str = "sandbox-controller-webhook";
/// Label every namespace carries with its own name (set by the apiserver).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Field manager of the server-side apply.
const FIELD_MANAGER: &str = "sandbox-controller-webhook";
/// The apiserver's per-call timeout may be at most this (the issue caps it at 5 seconds).
pub const MAX_TIMEOUT_SECONDS: i32 = 5;

/// How the apiserver reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `https://<listen address>/validate`, filled in once the port is bound (local runs).
    ListenAddress,
    /// A fixed URL.
    Url(String),
    /// An in-cluster Service.
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
}

/// What to register and how.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Name of the ValidatingWebhookConfiguration.
    pub name: String,
    pub target: Target,
    /// Validate only objects in this namespace.
    pub only_namespace: Option<String>,
    /// Never validate objects in this namespace (the controller's own).
    pub exclude_namespace: Option<String>,
    /// Per-call timeout for the apiserver, clamped to 1..=5 seconds.
    pub timeout_seconds: i32,
    /// Requests by this user skip the webhook (a `matchConditions` entry on
    /// `request.userInfo.username`): the controller's own finalizer and ledger writes must not
    /// wait on the webhook it may be serving itself, nor fail while it is down.
    pub exempt_username: Option<String>,
    /// Delete the configuration when the server stops. Right for a single local process; wrong for
    /// replicas behind a Service, where one replica stopping must not unregister the others.
    pub delete_on_shutdown: bool,
}

impl Registration {
    /// The configuration name for a webhook scoped to `namespace`: unique per namespace.
    pub fn scoped_name(base: &str, namespace: &str) -> String {
        let mut name = format!("{base}-{namespace}");
        name.truncate(253);
        name
    }
}

/// The configuration to apply. `url` is used for [`Target::ListenAddress`] and [`Target::Url`].
pub fn configuration(
    registration: &Registration,
    url: &str,
    ca_bundle: &[u8],
) -> ValidatingWebhookConfiguration {
    let client_config = match &registration.target {
        Target::ListenAddress | Target::Url(_) => WebhookClientConfig {
            url: Some(url.to_owned()),
            ca_bundle: Some(ByteString(ca_bundle.to_vec())),
            service: None,
        },
        Target::Service {
            namespace,
            name,
            port,
        } => WebhookClientConfig {
            url: None,
            ca_bundle: Some(ByteString(ca_bundle.to_vec())),
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                port: Some(*port),
                path: Some(VALIDATE_PATH.to_owned()),
            }),
        },
    };
    let mut expressions = Vec::new();
    if let Some(ns) = &registration.only_namespace {
        expressions.push(requirement("In", ns));
    }
    if let Some(ns) = &registration.exclude_namespace {
        expressions.push(requirement("NotIn", ns));
    }
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(registration.name.clone()),
            labels: Some(
                [(
                    names::LABEL_MANAGED_BY.to_owned(),
                    names::MANAGED_BY.to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: WEBHOOK_NAME.to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            client_config,
            failure_policy: Some("Fail".to_owned()),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(registration.timeout_seconds.clamp(1, MAX_TIMEOUT_SECONDS)),
            match_policy: Some("Equivalent".to_owned()),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(expressions),
                match_labels: None,
            }),
            match_conditions: registration.exempt_username.as_ref().map(|user| {
                vec![MatchCondition {
                    name: "not-the-controller".to_owned(),
                    expression: exempt_expression(user),
                }]
            }),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![GROUP.to_owned()]),
                api_versions: Some(vec![VERSION.to_owned()]),
                operations: Some(vec!["CREATE".to_owned(), "UPDATE".to_owned()]),
                // The scale subresource too: otherwise `kubectl scale` would bypass the replica bound.
                resources: Some(vec![
                    "batchsandboxes".to_owned(),
                    "batchsandboxes/scale".to_owned(),
                    "pools".to_owned(),
                ]),
                scope: Some("Namespaced".to_owned()),
            }]),
            ..Default::default()
        }]),
    }
}

/// The CEL expression that sends every request but `user`'s to the webhook.
pub fn exempt_expression(user: &str) -> String {
    let quoted = serde_json::to_string(user).unwrap_or_else(|_| "\"\"".into());
    format!("request.userInfo.username != {quoted}")
}

fn requirement(operator: &str, namespace: &str) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: NAMESPACE_NAME_LABEL.to_owned(),
        operator: operator.to_owned(),
        values: Some(vec![namespace.to_owned()]),
    }
}

/// Creates or updates the configuration.
pub async fn apply(
    client: &kube::Client,
    config: &ValidatingWebhookConfiguration,
) -> Result<(), kube::Error> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let name = config
        .metadata
        .name
        .as_deref()
        .unwrap_or(DEFAULT_CONFIGURATION_NAME);
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(config),
    )
    .await?;
    Ok(())
}

/// Deletes the configuration; one that is already gone is fine.
pub async fn delete(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(target: Target) -> Registration {
        Registration {
            name: Registration::scoped_name(DEFAULT_CONFIGURATION_NAME, "team-a"),
            target,
            only_namespace: Some("team-a".into()),
            exclude_namespace: Some("opensandbox-system".into()),
            timeout_seconds: 30,
            exempt_username: Some(
                "system:serviceaccount:opensandbox-system:sandbox-controller".into(),
            ),
            delete_on_shutdown: true,
        }
    }

    #[test]
    fn local_registration_points_at_the_url_with_the_ca_and_the_required_settings() {
        let config = configuration(
            &registration(Target::ListenAddress),
            "https://127.0.0.1:4321/validate",
            b"PEM",
        );
        assert_eq!(
            config.metadata.name.as_deref(),
            Some("sandbox-controller-webhook-team-a")
        );
        let webhook = &config.webhooks.as_ref().unwrap()[0];
        assert_eq!(
            webhook.client_config.url.as_deref(),
            Some("https://127.0.0.1:4321/validate")
        );
        assert_eq!(webhook.client_config.ca_bundle.as_ref().unwrap().0, b"PEM");
        assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(webhook.side_effects, "None");
        assert_eq!(webhook.timeout_seconds, Some(5), "clamped to the 5 s cap");
        let rule = &webhook.rules.as_ref().unwrap()[0];
        assert_eq!(rule.operations.as_ref().unwrap(), &["CREATE", "UPDATE"]);
        assert!(
            rule.resources
                .as_ref()
                .unwrap()
                .contains(&"batchsandboxes/scale".to_string())
        );

        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["apiVersion"], "admissionregistration.k8s.io/v1");
        assert_eq!(json["kind"], "ValidatingWebhookConfiguration");
        let selector = &json["webhooks"][0]["namespaceSelector"]["matchExpressions"];
        assert_eq!(
            selector[0],
            serde_json::json!({"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a"]})
        );
        assert_eq!(selector[1]["operator"], "NotIn");
        assert_eq!(
            json["webhooks"][0]["matchConditions"],
            serde_json::json!([{
                "name": "not-the-controller",
                "expression": "request.userInfo.username != \"system:serviceaccount:opensandbox-system:sandbox-controller\""
            }]),
            "the controller's own writes never wait on the webhook"
        );
        assert_eq!(selector[1]["values"][0], "opensandbox-system");
    }

    #[test]
    fn service_registration_uses_the_service_and_the_validate_path() {
        let target = Target::Service {
            namespace: "opensandbox-system".into(),
            name: "sandbox-controller-webhook".into(),
            port: 443,
        };
        let mut reg = registration(target);
        reg.only_namespace = None;
        reg.timeout_seconds = 0;
        let config = configuration(&reg, "ignored", b"PEM");
        let webhook = &config.webhooks.as_ref().unwrap()[0];
        assert!(webhook.client_config.url.is_none());
        let service = webhook.client_config.service.as_ref().unwrap();
        assert_eq!(
            (service.name.as_str(), service.port, service.path.as_deref()),
            ("sandbox-controller-webhook", Some(443), Some(VALIDATE_PATH))
        );
        assert_eq!(webhook.timeout_seconds, Some(1));
        assert_eq!(
            webhook
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_expressions
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }
}
