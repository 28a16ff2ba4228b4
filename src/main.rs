use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sandbox_controller::api;
use sandbox_controller::controller::{self, ControllerConfig, ExecutorSettings, PoolInjection};
use sandbox_controller::domain::endpoints::EndpointsFormat;
use sandbox_controller::executor::{self, runner};
use sandbox_controller::health::Health;
use sandbox_controller::leader::{self, LeaderConfig};
use sandbox_controller::policy::cli::PolicyCommand;
use sandbox_controller::policy::{
    Limits, NativePolicies, PolicyEngine, PolicyRegistry, RegistryConfig,
};
use sandbox_controller::webhook::{
    self, Registration, Target, Webhook, registration::DEFAULT_CONFIGURATION_NAME,
};

/// Kubernetes controller for OpenSandbox BatchSandbox and Pool resources.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at start-up; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the controller against the cluster in $KUBECONFIG (or the in-cluster config).
    Run(RunArgs),
    /// Run a real task executor for every local (kwok) pod that needs one: Running pods with a
    /// `task-executor` container and a 127.x.y.z pod IP get `sandbox-task-executor` bound to
    /// `<podIP>:5758`, stopped again when the pod goes away.
    LocalExecutors(LocalExecutorsArgs),
    /// Run only the validating admission webhook for BatchSandbox and Pool.
    Webhook(WebhookArgs),
    /// Write a CA and a serving certificate for the webhook (for installs that manage the
    /// caBundle themselves): ca.crt, tls.crt and tls.key.
    WebhookCerts {
        /// Directory to write into.
        #[arg(long)]
        out_dir: PathBuf,
        /// Subject alternative names, e.g. sandbox-controller-webhook.opensandbox-system.svc.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
    },
    /// Check, try out or benchmark WebAssembly policy components.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Write the CustomResourceDefinitions as YAML files (one per kind).
    Crdgen {
        /// Directory to write into.
        #[arg(long, default_value = "crds")]
        out_dir: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Manage only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Reconciles running at once, per kind.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Format of the `sandbox.opensandbox.io/endpoints` annotation: `auto` writes the plain list
    /// of IP strings for BatchSandboxes of OpenSandbox's server (label `opensandbox.io/id`) and
    /// the spec's objects for all others; `objects` or `ips` force one form for every batch.
    #[arg(long, value_enum, default_value_t = EndpointsFormat::Auto)]
    endpoints_format: EndpointsFormat,
    /// Seconds between periodic re-checks of every object.
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// Address of the `/healthz`, `/readyz` and `/metrics` endpoints.
    #[arg(long, default_value = "127.0.0.1:8081")]
    health_addr: std::net::SocketAddr,
    /// Reconcile only while holding a Lease, so several replicas can run safely.
    #[arg(long)]
    leader_elect: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "sandbox-controller")]
    lease_name: String,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Image of the task-executor sidecar injected into pods that run tasks.
    #[arg(
        long,
        env = "EXECUTOR_IMAGE",
        default_value = "opensandbox/sandbox-task-executor:latest"
    )]
    executor_image: String,
    /// Secret (key `token`) the injected executor reads its bearer token from. Without it the
    /// sidecar runs unauthenticated.
    #[arg(long, env = "EXECUTOR_TOKEN_SECRET")]
    executor_token_secret: Option<String>,
    /// File with the bearer token the controller presents to executors (the Secret's value
    /// mounted in-cluster; `.dev/executor-token` locally).
    #[arg(long, env = "EXECUTOR_TOKEN_FILE")]
    executor_token_file: Option<PathBuf>,
    /// Which pool pods get the executor sidecar: `always`, or `annotated` (Pools annotated
    /// `sandbox.opensandbox.io/task-executor: "true"`).
    #[arg(long, value_enum, default_value_t = PoolInjection::Always)]
    pool_executor_injection: PoolInjection,
    /// Also serve the validating admission webhook (configured by the --webhook-* flags), on
    /// every replica whether it leads or not. With --namespace, the webhook is scoped to that
    /// namespace too.
    #[arg(long)]
    webhook: bool,
    #[command(flatten)]
    webhook_args: WebhookArgs,
    #[command(flatten)]
    policy: PolicyArgs,
}

#[derive(Args)]
struct PolicyArgs {
    /// Which engine makes the pool-sizing, shard-task and expiry decisions: `wasm` (the embedded
    /// WebAssembly defaults plus custom policies) or `native` (built-in Rust, no custom policies).
    #[arg(long, value_enum, default_value_t = PolicyEngineKind::Wasm)]
    policy_engine: PolicyEngineKind,
    /// Directory of custom policies: `<name>.wasm`, optional `<name>.json` settings and
    /// `<name>.sha256` pin. Polled for changes.
    #[arg(long, env = "POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// Namespace whose ConfigMaps labelled `policy.sandbox.opensandbox.io/policy=true` hold custom
    /// policies (normally the controller's own). Unset: ConfigMaps are not watched.
    #[arg(long, env = "POD_NAMESPACE")]
    policy_namespace: Option<String>,
    /// Seconds between checks of --policy-dir.
    #[arg(long, default_value_t = 2)]
    policy_poll_seconds: u64,
    /// Fuel (about one unit per WebAssembly instruction) for one policy decision.
    #[arg(long, default_value_t = Limits::default().fuel)]
    policy_fuel: u64,
    /// Wall-clock limit of one policy decision, in milliseconds.
    #[arg(long, default_value_t = Limits::default().timeout.as_millis() as u64)]
    policy_timeout_ms: u64,
    /// Memory limit of one policy instance, in MiB.
    #[arg(long, default_value_t = Limits::default().memory_bytes >> 20)]
    policy_memory_mib: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyEngineKind {
    Wasm,
    Native,
}

#[derive(Args, Clone)]
struct WebhookArgs {
    /// Address the webhook listens on; port 0 picks a free one.
    #[arg(
        long = "webhook-listen",
        env = "WEBHOOK_LISTEN",
        default_value = "127.0.0.1:9443"
    )]
    listen: SocketAddr,
    /// Directory holding tls.crt, tls.key and ca.crt.
    #[arg(
        long = "webhook-cert-dir",
        env = "WEBHOOK_CERT_DIR",
        default_value = "/tmp/sandbox-controller/webhook-certs"
    )]
    cert_dir: PathBuf,
    /// `generate`: make a fresh CA and serving certificate at start (local runs); `files`: use the
    /// files as they are (cert-manager). Either way, changed files are reloaded.
    #[arg(long = "webhook-certs", value_enum, default_value_t = CertSource::Generate)]
    certs: CertSource,
    /// Subject alternative names of a generated certificate.
    #[arg(long = "webhook-cert-san", default_values_t = webhook::default_sans())]
    sans: Vec<String>,
    /// Seconds between checks of the certificate files for changes.
    #[arg(long = "webhook-cert-reload-seconds", default_value_t = 10)]
    reload_seconds: u64,
    /// `url`: register https://<listen address>/validate (local runs); `service`: register
    /// --webhook-service with ca.crt as caBundle (in-cluster, self-managed); `none`: the
    /// configuration comes from manifests (cert-manager's inject-ca-from).
    #[arg(long = "webhook-registration", value_enum, default_value_t = RegistrationMode::Url)]
    registration: RegistrationMode,
    /// The Service for `--webhook-registration service`, as namespace/name:port.
    #[arg(
        long = "webhook-service",
        default_value = "opensandbox-system/sandbox-controller-webhook:443"
    )]
    service: String,
    /// Name of the ValidatingWebhookConfiguration. With --webhook-namespace, the namespace is
    /// appended, so each scoped webhook has its own.
    #[arg(long = "webhook-configuration-name", default_value = DEFAULT_CONFIGURATION_NAME)]
    configuration_name: String,
    /// Validate objects in this namespace only.
    #[arg(long = "webhook-namespace")]
    only_namespace: Option<String>,
    /// The controller's own namespace, which the webhook never validates.
    #[arg(
        long = "controller-namespace",
        env = "POD_NAMESPACE",
        default_value = "opensandbox-system"
    )]
    controller_namespace: String,
    /// Leave the configuration registered on shutdown (the default for `service`, where other
    /// replicas keep serving).
    #[arg(long = "webhook-keep-registration")]
    keep_registration: bool,
    /// Seconds the apiserver waits for the webhook per request (1 to 5).
    #[arg(
        long = "webhook-timeout-seconds",
        default_value_t = 5,
        value_parser = clap::value_parser!(i32).range(1..=5)
    )]
    timeout_seconds: i32,
    /// Largest spec.replicas admitted.
    #[arg(
        long = "max-replicas",
        default_value_t = webhook::RuleSettings::default().max_replicas,
        value_parser = clap::value_parser!(i32).range(0..)
    )]
    max_replicas: i32,
    /// A policy name that `policy.sandbox.opensandbox.io/<decision>` annotations may use (repeat
    /// for several).
    #[arg(long = "policy-name")]
    policy_names: Vec<String>,
    /// Largest AdmissionReview body accepted, in bytes.
    #[arg(
        long = "webhook-max-body-bytes",
        default_value_t = webhook::Limits::default().max_body_bytes
    )]
    max_body_bytes: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum CertSource {
    Generate,
    Files,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RegistrationMode {
    Url,
    Service,
    None,
}

#[derive(Args)]
struct LocalExecutorsArgs {
    /// State directory of the local control plane; executors keep their data in
    /// `<dir>/executors/<namespace>/<pod>`.
    #[arg(long, env = "SBX_DEV_DIR", default_value = ".dev")]
    state_dir: PathBuf,
    /// The bearer token file the executors require and the controller must send; created with a
    /// random token if missing. Default: `<state dir>/executor-token`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The `sandbox-task-executor` binary. Default: next to this binary.
    #[arg(long)]
    executor_bin: Option<PathBuf>,
    /// Port the executors' task API listens on, on each pod's IP.
    #[arg(long, default_value_t = executor::EXECUTOR_PORT)]
    port: u16,
    /// Port of the command API (OpenSandbox's execd) on each pod's IP.
    #[arg(long, default_value_t = executor::command::COMMAND_PORT)]
    command_port: u16,
    /// The access token file the command API requires (X-EXECD-ACCESS-TOKEN). Default: none, as
    /// OpenSandbox's SDK 1.1.1 sends none.
    #[arg(long)]
    command_token_file: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a task times out or is stopped.
    #[arg(long, default_value_t = 10)]
    kill_grace_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Crdgen { out_dir } => crdgen(&out_dir),
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(args)),
        Command::Policy(command) => {
            let code = sandbox_controller::policy::cli::run(command)?;
            std::process::exit(code);
        }
        Command::LocalExecutors(args) => {
            tokio::runtime::Runtime::new()?.block_on(local_executors(args))
        }
        Command::Webhook(args) => tokio::runtime::Runtime::new()?.block_on(run_webhook(args)),
        Command::WebhookCerts { out_dir, sans } => {
            webhook::write_certificates(&out_dir, &sans)?;
            let dir = out_dir.display();
            println!("wrote {dir}/{{ca.crt,tls.crt,tls.key}}; caBundle: base64 -w0 {dir}/ca.crt");
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (is KUBECONFIG set?)")?;
    let policies = start_policies(&args.policy, &client).await?;
    let webhook = if args.webhook {
        let mut webhook_args = args.webhook_args.clone();
        webhook_args.only_namespace = webhook_args
            .only_namespace
            .or_else(|| args.namespace.clone());
        Some(bind_webhook(webhook_args, Some(client.clone()), Some(policies.clone())).await?)
    } else {
        None
    };
    let token = match &args.executor_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the executor token from {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var(sandbox_controller::executor::TOKEN_ENV).ok(),
    };
    let config = ControllerConfig {
        executor: ExecutorSettings {
            image: args.executor_image.clone(),
            token_secret: args.executor_token_secret.clone(),
            token,
            pool_injection: args.pool_executor_injection,
        },
        namespace: args.namespace,
        concurrency: args.concurrency.max(1),
        endpoints_format: args.endpoints_format,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
    };
    let health = Arc::new(Health::default());
    {
        let policies = policies.clone();
        let mut extra = health.extra.lock().unwrap_or_else(|e| e.into_inner());
        extra.push(Box::new(move || policies.metrics_text()));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn({
        let health = health.clone();
        let stopped = stopped();
        async move {
            if let Err(error) =
                sandbox_controller::health::serve(args.health_addr, health, stopped).await
            {
                tracing::error!(%error, addr = %args.health_addr, "health endpoint failed");
            }
        }
    });
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let webhook = webhook.map(|webhook| tokio::spawn(webhook.run(stopped())));

    let controller = async {
        if args.leader_elect {
            let leader = LeaderConfig {
                namespace: args.leader_election_namespace,
                lease_name: args.lease_name,
                identity: std::env::var("POD_NAME")
                    .unwrap_or_else(|_| format!("{}-{}", hostname(), std::process::id())),
                lease_duration: Duration::from_secs(args.lease_duration_seconds),
            };
            let leading = tokio::select! {
                leading = leader::acquire(client.clone(), &leader) => leading?,
                _ = stopped() => return Ok(()),
            };
            let lost = leader::lost(leading);
            tokio::select! {
                result = controller::run(client, policies, config, health, stopped()) => result,
                _ = lost => anyhow::bail!("lost the leader lease {}; exiting so a fresh process takes over as follower", leader.lease_name),
            }
        } else {
            controller::run(client, policies, config, health, stopped()).await
        }
    };
    match webhook {
        None => controller.await,
        Some(webhook) => alongside_webhook(controller, webhook).await,
    }
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

async fn run_webhook(args: WebhookArgs) -> anyhow::Result<()> {
    let webhook = bind_webhook(args, None, None).await?;
    webhook
        .run(shutdown_signal())
        .await
        .context("admission webhook")
}

/// Binds the webhook and prints where it listens (tests and scripts read this line).
/// Binds the webhook. `loaded` adds the names of policies the running engine has loaded to the
/// names given with `--policy-name`.
async fn bind_webhook(
    args: WebhookArgs,
    client: Option<kube::Client>,
    loaded: Option<Arc<dyn PolicyEngine>>,
) -> anyhow::Result<Webhook> {
    let registration = match args.registration {
        RegistrationMode::None => None,
        mode => {
            let target = match mode {
                RegistrationMode::Service => parse_service(&args.service)?,
                _ => Target::ListenAddress,
            };
            if args.only_namespace.as_deref() == Some(args.controller_namespace.as_str()) {
                anyhow::bail!(
                    "--webhook-namespace {} is the controller's own namespace, which is never validated",
                    args.controller_namespace
                );
            }
            let name = match &args.only_namespace {
                Some(ns) => Registration::scoped_name(&args.configuration_name, ns),
                None => args.configuration_name.clone(),
            };
            let client = match client {
                Some(client) => client,
                None => kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API to register the webhook")?,
            };
            let registration = Registration {
                name,
                target,
                only_namespace: args.only_namespace.clone(),
                exclude_namespace: Some(args.controller_namespace.clone()),
                timeout_seconds: args.timeout_seconds,
                delete_on_shutdown: !args.keep_registration && mode == RegistrationMode::Url,
            };
            Some((client, registration))
        }
    };
    let config = webhook::WebhookConfig {
        listen: args.listen,
        tls: webhook::TlsSettings {
            cert_dir: args.cert_dir,
            generate_for: matches!(args.certs, CertSource::Generate).then_some(args.sans),
            reload_interval: Duration::from_secs(args.reload_seconds.max(1)),
        },
        rules: webhook::RuleSettings {
            max_replicas: args.max_replicas,
            policy_exists: {
                let listed = webhook::known_policies(args.policy_names);
                match loaded {
                    Some(engine) => {
                        Arc::new(move |name: &str| listed(name) || engine.is_known(name))
                    }
                    None => listed,
                }
            },
        },
        limits: webhook::Limits {
            max_body_bytes: args.max_body_bytes,
            ..webhook::Limits::default()
        },
        registration,
    };
    let webhook = Webhook::bind(config).await?;
    println!("webhook listening on {}", webhook.url());
    Ok(webhook)
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

async fn start_policies(
    args: &PolicyArgs,
    client: &kube::Client,
) -> anyhow::Result<Arc<dyn PolicyEngine>> {
    if let PolicyEngineKind::Native = args.policy_engine {
        tracing::info!("policy decisions are made natively; custom policies are disabled");
        return Ok(Arc::new(NativePolicies));
    }
    let config = RegistryConfig {
        namespace: args.policy_namespace.clone(),
        dir: args.policy_dir.clone(),
        poll_interval: Duration::from_secs(args.policy_poll_seconds.max(1)),
        limits: Limits {
            fuel: args.policy_fuel,
            timeout: Duration::from_millis(args.policy_timeout_ms.max(1)),
            memory_bytes: args.policy_memory_mib.max(1) << 20,
            ..Limits::default()
        },
    };
    if config.namespace.is_none() {
        tracing::info!(
            "no --policy-namespace (or POD_NAMESPACE): policy ConfigMaps are not watched"
        );
    }
    let policies = PolicyRegistry::start(Some(client.clone()), config)
        .await
        .context("starting the policy engine")?;
    tracing::info!("policy decisions run in WebAssembly: embedded defaults plus custom policies");
    Ok(policies)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "sandbox-controller".into())
}

async fn local_executors(args: LocalExecutorsArgs) -> anyhow::Result<()> {
    let state_dir = std::path::absolute(&args.state_dir)?;
    let token_file = args
        .token_file
        .unwrap_or_else(|| state_dir.join("executor-token"));
    runner::ensure_token_file(&token_file)?;
    let executor_bin = match args.executor_bin {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("sandbox-task-executor"),
    };
    anyhow::ensure!(
        executor_bin.is_file(),
        "{} not found; build it with `cargo build --bin sandbox-task-executor` or pass --executor-bin",
        executor_bin.display()
    );
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (is KUBECONFIG set?)")?;
    let config = runner::RunnerConfig {
        state_dir,
        executor_bin,
        token_file,
        port: args.port,
        command_port: args.command_port,
        command_token_file: args.command_token_file,
        kill_grace: Duration::from_secs(args.kill_grace_seconds),
    };
    runner::run(client, config, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
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
    tracing::info!("shutdown requested; finishing in-flight reconciles");
}

fn crdgen(out_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for crd in api::all_crds() {
        let path = out_dir.join(api::crd_file_name(&crd));
        std::fs::write(&path, api::render_crd_yaml(&crd)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
