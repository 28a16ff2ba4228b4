//! The process shell every binary shares: logging, shutdown signals, the health and metrics
//! server, and leader election.

pub mod api_client;
mod executor_key;
pub mod health;
pub mod leader;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use sandbox_policy::{Limits, NativePolicies, PolicyEngine, PolicyRegistry, RegistryConfig};

use crate::controller::{self, ControllerConfig, ControllerMetrics};
use crate::webhook::{self, Registration, Target, Webhook};
use api_client::ApiProtocol;
use health::Health;
use leader::LeaderConfig;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`, kube's own at `warn`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    // Colours only for a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested; finishing in-flight work");
}

/// Everything `sandbox-controller run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub controller: ControllerConfig,
    /// Where the key the controller signs executor requests with comes from.
    pub executor_key: ExecutorKeySource,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub health_addr: SocketAddr,
    /// Reconcile only while holding this Lease (`None`: always).
    pub leader: Option<LeaderConfig>,
    /// Serve the admission webhook next to the controller (`None`: don't).
    pub webhook: Option<WebhookSettings>,
    pub policy: PolicySettings,
    /// Which HTTP versions the API client offers.
    pub api_protocol: ApiProtocol,
}

/// Where the controller's executor signing key comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExecutorKeySource {
    /// No key: injected executors run unauthenticated.
    #[default]
    None,
    /// A file holding the hex seed (`--executor-signing-key-file`).
    File(PathBuf),
    /// A Secret the controller reads, and creates with a fresh key if it is missing.
    Secret { namespace: String, name: String },
}

/// Which policy engine decides, and where custom policies come from.
#[derive(Clone, Debug, Default)]
pub struct PolicySettings {
    /// Decide natively (no WebAssembly, no custom policies).
    pub native: bool,
    /// Namespace whose labelled ConfigMaps hold custom policies.
    pub namespace: Option<String>,
    /// Directory of custom policies.
    pub dir: Option<PathBuf>,
    pub poll_interval: Duration,
    pub limits: Limits,
}

/// How the admission webhook serves and registers itself.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub listen: SocketAddr,
    pub tls: webhook::TlsSettings,
    pub registration: RegistrationSettings,
    /// Name of the ValidatingWebhookConfiguration (the scoped namespace is appended).
    pub configuration_name: String,
    /// Validate objects in this namespace only.
    pub only_namespace: Option<String>,
    /// The controller's own namespace, never validated.
    pub controller_namespace: String,
    /// Leave the configuration registered on shutdown.
    pub keep_registration: bool,
    pub timeout_seconds: i32,
    pub max_replicas: i32,
    /// Policy names the policy annotations may use, beyond those the engine has loaded.
    pub policy_names: Vec<String>,
    pub max_body_bytes: usize,
    /// The controller's username (`None`: the identity this process authenticates as).
    pub controller_username: Option<String>,
}

/// How the ValidatingWebhookConfiguration is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationSettings {
    /// `https://<listen address>/validate`, deleted on shutdown unless kept.
    Url,
    /// A Service, `namespace/name:port`; left registered on shutdown.
    Service(String),
    /// The configuration comes from manifests.
    None,
}

/// This replica's name in leases and events: `$POD_NAME`, else host name and pid.
pub fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "sandbox-controller".into());
        format!("{host}-{}", std::process::id())
    })
}

/// Runs the controller (and, if configured, the webhook) until `shutdown` resolves and in-flight
/// work has finished, or until leadership is lost.
pub async fn run(
    config: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = api_client::connect(config.api_protocol)
        .await
        .context("connecting to the Kubernetes API (is KUBECONFIG set?)")?;
    let mut registry = Registry::default();
    let policies = start_policies(&config.policy, &client, &mut registry).await?;
    let webhook = match config.webhook.clone() {
        Some(mut settings) => {
            settings.controller_username =
                Some(controller_username(settings.controller_username.take(), &client).await?);
            let webhook =
                bind_webhook(settings, Some(client.clone()), Some(policies.clone())).await?;
            webhook
                .admissions()
                .register(registry.sub_registry_with_prefix("sandbox_webhook"));
            Some(webhook)
        }
        None => None,
    };
    let mut controller_config = config.controller.clone();
    controller_config.executor.signing_key =
        executor_key::load(&config.executor_key, &client).await?;
    if controller_config.executor.signing_key.is_none() {
        tracing::warn!(
            "no executor signing key (--executor-signing-key-secret or --executor-signing-key-file): injected task executors accept requests from anyone who can reach them"
        );
    }
    let health = Health::default();
    let metrics = ControllerMetrics::default();
    let own = registry.sub_registry_with_prefix("sandbox_controller");
    health.register(own);
    metrics.register(own);
    let registry = Arc::new(registry);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn({
        let (health, stopped, addr) = (health.clone(), stopped(), config.health_addr);
        async move {
            if let Err(error) = health::serve(addr, health, registry, stopped).await {
                tracing::error!(%error, %addr, "health endpoint failed");
            }
        }
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let webhook = webhook.map(|webhook| tokio::spawn(webhook.run(stopped())));
    if config.leader.is_some() {
        controller_config.fence = leader::Fence::leased();
    }
    let fence = controller_config.fence.clone();
    health.follow_fence(fence.clone());
    let controller = async {
        // On the runtime's workers, not on the thread that polls this future (`block_on`'s):
        // every watch event, reconcile and API reply would otherwise pass between that thread
        // and a worker, each hand-over a thread wake-up. Spawned only once polled, so a follower
        // starts it when it leads; aborted when dropped (leadership lost).
        let reconcile = async {
            let mut task = AbortOnDrop(tokio::spawn(controller::run(
                client.clone(),
                policies,
                controller_config,
                health,
                metrics,
                stopped(),
            )));
            (&mut task.0)
                .await
                .context("the controller task panicked")?
        };
        let Some(leader_config) = &config.leader else {
            return reconcile.await;
        };
        let mut leadership = tokio::select! {
            leading = leader::acquire(client.clone(), leader_config) => leading?,
            _ = stopped() => return Ok(()),
        };
        let prover = tokio::spawn(leader::prove(client.clone(), leader_config.clone(), fence));
        let result = tokio::select! {
            result = reconcile => result,
            _ = leadership.lost() => Err(anyhow::anyhow!(
                "lost the leader lease {}; exiting so a fresh process takes over as follower",
                leader_config.lease_name
            )),
        };
        prover.abort();
        if result.is_ok() {
            // A graceful stop (a rolling update) hands the lease over at once.
            leadership.release().await;
        }
        result
    };
    match webhook {
        None => controller.await,
        Some(webhook) => alongside_webhook(controller, webhook).await,
    }
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs only the admission webhook until `shutdown` resolves.
pub async fn run_webhook(
    mut settings: WebhookSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = match settings.controller_username {
        Some(_) => None,
        None => Some(
            api_client::connect(ApiProtocol::default())
                .await
                .context("connecting to the Kubernetes API to learn the controller's username (or pass --controller-username)")?,
        ),
    };
    if let Some(client) = &client {
        settings.controller_username = Some(controller_username(None, client).await?);
    }
    let webhook = bind_webhook(settings, client, None).await?;
    webhook.run(shutdown).await.context("admission webhook")
}

/// Runs the controller while the webhook serves. A webhook that fails ends the process, so it is
/// restarted rather than leaving the apiserver to refuse every write (failurePolicy Fail).
async fn alongside_webhook(
    controller: impl Future<Output = anyhow::Result<()>>,
    mut webhook: tokio::task::JoinHandle<Result<(), webhook::Error>>,
) -> anyhow::Result<()> {
    let served = |joined: Result<Result<(), webhook::Error>, tokio::task::JoinError>| {
        joined
            .context("the admission webhook task failed")?
            .context("admission webhook")
    };
    tokio::pin!(controller);
    tokio::select! {
        result = &mut controller => {
            let webhook_result = served(webhook.await);
            result.and(webhook_result)
        }
        joined = &mut webhook => {
            served(joined)?;
            controller.await
        }
    }
}

/// Binds the webhook and prints where it listens (tests and scripts read this line). `loaded`
/// adds the names of policies the running engine has loaded to the names given in settings.
async fn bind_webhook(
    settings: WebhookSettings,
    client: Option<kube::Client>,
    loaded: Option<Arc<dyn PolicyEngine>>,
) -> anyhow::Result<Webhook> {
    let target = match &settings.registration {
        RegistrationSettings::None => None,
        RegistrationSettings::Url => Some(Target::ListenAddress),
        RegistrationSettings::Service(spec) => Some(parse_service(spec)?),
    };
    let registration = match target {
        None => None,
        Some(target) => {
            if settings.only_namespace.as_deref() == Some(settings.controller_namespace.as_str()) {
                anyhow::bail!(
                    "--webhook-namespace {} is the controller's own namespace, which is never validated",
                    settings.controller_namespace
                );
            }
            let name = match &settings.only_namespace {
                Some(ns) => Registration::scoped_name(&settings.configuration_name, ns),
                None => settings.configuration_name.clone(),
            };
            let client = match client {
                Some(client) => client,
                None => api_client::connect(ApiProtocol::default())
                    .await
                    .context("connecting to the Kubernetes API to register the webhook")?,
            };
            let registration = Registration {
                name,
                target,
                only_namespace: settings.only_namespace.clone(),
                exclude_namespace: Some(settings.controller_namespace.clone()),
                timeout_seconds: settings.timeout_seconds,
                // Only a service account is exempted: a controller run under a person's own
                // credentials (local development) would otherwise exempt that person too.
                exempt_username: settings
                    .controller_username
                    .clone()
                    .filter(|user| user.starts_with("system:serviceaccount:")),
                delete_on_shutdown: !settings.keep_registration
                    && settings.registration == RegistrationSettings::Url,
            };
            Some((client, registration))
        }
    };
    let listed = webhook::known_policies(settings.policy_names);
    let policy_exists: webhook::PolicyCheck = match loaded {
        Some(engine) => Arc::new(move |name: &str| listed(name) || engine.is_known(name)),
        None => listed,
    };
    let config = webhook::WebhookConfig {
        listen: settings.listen,
        tls: settings.tls,
        rules: webhook::RuleSettings {
            max_replicas: settings.max_replicas,
            policy_exists,
            controller_username: settings.controller_username.clone(),
        },
        limits: webhook::Limits {
            max_body_bytes: settings.max_body_bytes,
            ..webhook::Limits::default()
        },
        registration,
    };
    let webhook = Webhook::bind(config).await?;
    println!("webhook listening on {}", webhook.url());
    Ok(webhook)
}

/// The controller's username: `given`, else the identity `client` authenticates as.
async fn controller_username(
    given: Option<String>,
    client: &kube::Client,
) -> anyhow::Result<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    if let Some(user) = given {
        return Ok(user);
    }
    let api: kube::Api<SelfSubjectReview> = kube::Api::all(client.clone());
    let review = api
        .create(&kube::api::PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("asking the API server who this process is (SelfSubjectReview); pass --controller-username instead")?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .context("the SelfSubjectReview named no user; pass --controller-username")?;
    tracing::info!(%user, "the controller's identity: only it may write ledger annotations");
    Ok(user)
}

/// `namespace/name:port` of the webhook Service.
fn parse_service(spec: &str) -> anyhow::Result<Target> {
    let invalid =
        || anyhow::anyhow!("--webhook-service must look like namespace/name:port, not {spec:?}");
    let (namespace, rest) = spec.split_once('/').ok_or_else(invalid)?;
    let (name, port) = rest.split_once(':').ok_or_else(invalid)?;
    let port = port.parse::<i32>().map_err(|_| invalid())?;
    if namespace.is_empty() || name.is_empty() {
        return Err(invalid());
    }
    Ok(Target::Service {
        namespace: namespace.into(),
        name: name.into(),
        port,
    })
}

/// The policy engine `settings` ask for, its metrics registered into `registry`.
async fn start_policies(
    settings: &PolicySettings,
    client: &kube::Client,
    registry: &mut Registry,
) -> anyhow::Result<Arc<dyn PolicyEngine>> {
    if settings.native {
        tracing::info!("policy decisions are made natively; custom policies are disabled");
        return Ok(Arc::new(NativePolicies));
    }
    let config = RegistryConfig {
        namespace: settings.namespace.clone(),
        dir: settings.dir.clone(),
        poll_interval: settings.poll_interval,
        limits: settings.limits,
    };
    if config.namespace.is_none() {
        tracing::info!(
            "no --policy-namespace (or POD_NAMESPACE): policy ConfigMaps are not watched"
        );
    }
    let policies = PolicyRegistry::start(Some(client.clone()), config)
        .await
        .context("starting the policy engine")?;
    policies.metrics().register(registry);
    tracing::info!("policy decisions run in WebAssembly: embedded defaults plus custom policies");
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prometheus_client::encoding::text::encode;
    use sandbox_policy::{Decision, DegradedReason, PolicyMetrics};

    use super::*;

    /// Every metric family the process exports, each with a sample so it renders.
    fn exported_families() -> BTreeSet<String> {
        let mut registry = Registry::default();
        let own = registry.sub_registry_with_prefix("sandbox_controller");
        let health = Health::default();
        health.register(own);
        let metrics = ControllerMetrics::default();
        metrics.register(own);
        metrics.reconciled("Pool", Duration::from_millis(1), Ok(()));
        metrics.reconciled(
            "Pool",
            Duration::from_millis(1),
            Err(&controller::Error::Conflict(1)),
        );
        metrics.claimed("ns", "p", Duration::from_secs(1));
        metrics.pool_pods("ns", "p", 1, 1, 1);
        metrics.writes.count(controller::WriteTarget::Pod);
        let policy = PolicyMetrics::default();
        policy.register(&mut registry);
        policy.decided(Decision::Expiry);
        policy.degraded(Decision::Expiry, DegradedReason::Trap);
        policy.loaded(true);
        let admissions = webhook::AdmissionMetrics::default();
        admissions.register(registry.sub_registry_with_prefix("sandbox_webhook"));
        admissions.count(
            br#"{"request":{"kind":{"kind":"Pool"},"operation":"CREATE"}}"#,
            false,
        );
        let mut text = String::new();
        encode(&mut text, &registry).expect("encoding");
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// The family a series name in a query belongs to.
    fn family_of(series: &str) -> &str {
        ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|suffix| series.strip_suffix(suffix))
            .unwrap_or(series)
    }

    #[test]
    fn the_dashboard_and_the_alerts_query_only_exported_metrics() {
        let families = exported_families();
        assert!(
            families.contains("sandbox_controller_claim_duration_seconds"),
            "{families:?}"
        );
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring");
        for file in ["grafana-dashboard.json", "alerts.yaml"] {
            let text = std::fs::read_to_string(dir.join(file)).expect("reading the file");
            let mut used = 0;
            for (start, _) in text.match_indices("sandbox_") {
                let name: String = text[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if name == "sandbox_" || name.starts_with("sandbox_controller\"") {
                    continue;
                }
                // Names of dashboards, rules and groups are not metrics.
                if !name.starts_with("sandbox_controller_")
                    && !name.starts_with("sandbox_policy_")
                    && !name.starts_with("sandbox_webhook_")
                {
                    continue;
                }
                assert!(
                    families.contains(family_of(&name)),
                    "{file} queries {name}, which is not exported (exported: {families:?})"
                );
                used += 1;
            }
            assert!(used >= 5, "{file} queries only {used} metrics");
        }
    }
}
