//! The command line of `sandbox-controller`: every flag, and its conversion into the runtime's
//! settings. `docs/cli.md` is generated from these types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sandbox_policy::Limits;
use sandbox_policy::cli::PolicyCommand;

use crate::controller::{ControllerConfig, ExecutorSettings, PoolInjection};
use crate::runtime::api_client::ApiProtocol;
use crate::runtime::leader::LeaderConfig;
use crate::runtime::{ExecutorKeySource, LogFormat, PolicySettings, RunConfig, WebhookSettings};
use crate::webhook::{self, registration::DEFAULT_CONFIGURATION_NAME};
use sandbox_domain::endpoints::EndpointsFormat;

/// Kubernetes controller for OpenSandbox BatchSandbox and Pool resources.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Run the controller against the cluster in $KUBECONFIG (or the in-cluster config).
    Run(RunArgs),
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
pub struct RunArgs {
    /// Manage only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Reconciles running at once, per kind.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// Format of the `sandbox.opensandbox.io/endpoints` annotation: `auto` writes the plain list
    /// of IP strings for BatchSandboxes of OpenSandbox's server (label `opensandbox.io/id`) and
    /// the spec's objects for all others; `objects` or `ips` force one form for every batch.
    #[arg(long, value_enum, default_value_t = EndpointsFormatArg::Auto)]
    pub endpoints_format: EndpointsFormatArg,
    /// Seconds between periodic re-checks of every object.
    #[arg(long, default_value_t = 300)]
    pub resync_seconds: u64,
    /// Address of the `/healthz`, `/readyz` and `/metrics` endpoints.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub health_addr: std::net::SocketAddr,
    /// Reconcile only while holding a Lease, so several replicas can run safely.
    #[arg(long)]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "sandbox-controller")]
    pub lease_name: String,
    /// Seconds a leader's lease lasts without renewal. The leader stops writing allocations once
    /// it cannot prove a renewal within two thirds of this (the renew deadline).
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Seconds after a BatchSandbox's deletion that its cleanup waits for tasks to stop; then
    /// their pods are deleted (not recycled) and the deletion completes, with a Warning event.
    #[arg(long, default_value_t = 60)]
    pub cleanup_deadline_seconds: u64,
    /// Pool status writes per second, shared by all Pools, for changes that only move a Pool's
    /// counts (a changed condition is written at once). Each Pool's status is written at most once
    /// a second; with many Pools changing at once, their counts lag by up to Pools / this.
    #[arg(long, default_value_t = crate::controller::DEFAULT_POOL_STATUS_WRITES_PER_SECOND, value_parser = clap::value_parser!(u32).range(1..))]
    pub pool_status_writes_per_second: u32,
    /// Threads that run the watches, reconciles and API calls (policy compilation and custom
    /// policies run on threads of their own). The controller mostly waits on the API server, and
    /// a second thread mostly adds hand-offs between the two; raise this when the controller's
    /// CPU stays near one full core.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
    /// HTTP versions offered to the Kubernetes API server. `http1`: kube's client, a connection
    /// per request in flight. `negotiate`: HTTP/2 where the server accepts it, one connection for
    /// every request and watch (fewer connections, the same claim latency; a fault on that
    /// connection fails all of them at once, so recovery from a flaky network is slower; not
    /// with a kubeconfig `proxy-url`).
    #[arg(long, value_enum, default_value_t = ApiProtocol::Http1)]
    pub api_protocol: ApiProtocol,
    /// Image of the task-executor sidecar injected into pods that run tasks.
    #[arg(
        long,
        env = "EXECUTOR_IMAGE",
        default_value = "opensandbox/sandbox-task-executor:latest"
    )]
    pub executor_image: String,
    /// Secret in the controller's namespace (--controller-namespace) holding the Ed25519 key
    /// the controller signs executor requests with (key `signing-key`, 64 hex digits); created
    /// with a fresh key if missing. Injected executors get only its public half. Without this or
    /// --executor-signing-key-file, executors run unauthenticated.
    #[arg(long, env = "EXECUTOR_SIGNING_KEY_SECRET")]
    pub executor_signing_key_secret: Option<String>,
    /// File with that signing key (64 hex digits, mode 0400) instead of a Secret
    /// (`.dev/executor-signing-key` locally).
    #[arg(
        long,
        env = "EXECUTOR_SIGNING_KEY_FILE",
        conflicts_with = "executor_signing_key_secret"
    )]
    pub executor_signing_key_file: Option<PathBuf>,
    /// Which pool pods get the executor sidecar: `always`, or `annotated` (Pools annotated
    /// `sandbox.opensandbox.io/task-executor: "true"`).
    #[arg(long, value_enum, default_value_t = PoolInjection::Always)]
    pub pool_executor_injection: PoolInjection,
    /// Also serve the validating admission webhook (configured by the --webhook-* flags), on
    /// every replica whether it leads or not. With --namespace, the webhook is scoped to that
    /// namespace too.
    #[arg(long)]
    pub webhook: bool,
    #[command(flatten)]
    pub webhook_args: WebhookArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Args)]
pub struct PolicyArgs {
    /// Which engine makes the pool-sizing, shard-task, expiry and pool-selection decisions: `wasm` (the embedded
    /// WebAssembly defaults plus custom policies) or `native` (the same decisions in native Rust, no custom policies).
    #[arg(long, value_enum, default_value_t = PolicyEngineKind::Wasm)]
    pub policy_engine: PolicyEngineKind,
    /// Directory of custom policies: `<name>.wasm`, optional `<name>.json` settings and
    /// `<name>.sha256` pin. Polled for changes.
    #[arg(long, env = "POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// Namespace whose ConfigMaps labelled `policy.sandbox.opensandbox.io/policy=true` hold custom
    /// policies (normally the controller's own). Unset: ConfigMaps are not watched.
    #[arg(long, env = "POD_NAMESPACE")]
    pub policy_namespace: Option<String>,
    /// Seconds between checks of --policy-dir.
    #[arg(long, default_value_t = 2)]
    pub policy_poll_seconds: u64,
    /// Fuel (about one unit per WebAssembly instruction) for one policy decision.
    #[arg(long, default_value_t = Limits::default().fuel)]
    pub policy_fuel: u64,
    /// Wall-clock limit of one policy decision, in milliseconds; a call is stopped between 95 %
    /// and 100 % of it.
    #[arg(long, default_value_t = Limits::default().timeout.as_millis() as u64)]
    pub policy_timeout_ms: u64,
    /// Memory limit of one policy instance, in MiB.
    #[arg(long, default_value_t = Limits::default().memory_bytes >> 20)]
    pub policy_memory_mib: usize,
}

/// Which engine makes the delegated decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyEngineKind {
    /// The embedded WebAssembly defaults plus custom policies.
    Wasm,
    /// The same decisions in native Rust; no custom policies.
    Native,
}

#[derive(Args, Clone)]
pub struct WebhookArgs {
    /// Address the webhook listens on; port 0 picks a free one.
    #[arg(
        long = "webhook-listen",
        env = "WEBHOOK_LISTEN",
        default_value = "127.0.0.1:9443"
    )]
    pub listen: SocketAddr,
    /// Directory holding tls.crt, tls.key and ca.crt.
    #[arg(
        long = "webhook-cert-dir",
        env = "WEBHOOK_CERT_DIR",
        default_value = "/tmp/sandbox-controller/webhook-certs"
    )]
    pub cert_dir: PathBuf,
    /// `generate`: make a fresh CA and serving certificate at start (local runs); `files`: use the
    /// files as they are (cert-manager). Either way, changed files are reloaded.
    #[arg(long = "webhook-certs", value_enum, default_value_t = CertSource::Generate)]
    pub certs: CertSource,
    /// Subject alternative names of a generated certificate.
    #[arg(long = "webhook-cert-san", default_values_t = webhook::default_sans())]
    pub sans: Vec<String>,
    /// Seconds between checks of the certificate files for changes.
    #[arg(long = "webhook-cert-reload-seconds", default_value_t = 10)]
    pub reload_seconds: u64,
    /// `url`: register https://<listen address>/validate (local runs); `service`: register
    /// --webhook-service with ca.crt as caBundle (in-cluster, self-managed); `none`: the
    /// configuration comes from manifests (cert-manager's inject-ca-from).
    #[arg(long = "webhook-registration", value_enum, default_value_t = RegistrationMode::Url)]
    pub registration: RegistrationMode,
    /// The Service for `--webhook-registration service`, as namespace/name:port.
    #[arg(
        long = "webhook-service",
        default_value = "opensandbox-system/sandbox-controller-webhook:443"
    )]
    pub service: String,
    /// Name of the ValidatingWebhookConfiguration. With --webhook-namespace, the namespace is
    /// appended, so each scoped webhook has its own.
    #[arg(long = "webhook-configuration-name", default_value = DEFAULT_CONFIGURATION_NAME)]
    pub configuration_name: String,
    /// Validate objects in this namespace only.
    #[arg(long = "webhook-namespace")]
    pub only_namespace: Option<String>,
    /// The controller's own namespace, which the webhook never validates.
    #[arg(
        long = "controller-namespace",
        env = "POD_NAMESPACE",
        default_value = "opensandbox-system"
    )]
    pub controller_namespace: String,
    /// Leave the configuration registered on shutdown (the default for `service`, where other
    /// replicas keep serving).
    #[arg(long = "webhook-keep-registration")]
    pub keep_registration: bool,
    /// Seconds the apiserver waits for the webhook per request (1 to 5).
    #[arg(
        long = "webhook-timeout-seconds",
        default_value_t = 5,
        value_parser = clap::value_parser!(i32).range(1..=5)
    )]
    pub timeout_seconds: i32,
    /// Largest spec.replicas admitted.
    #[arg(
        long = "max-replicas",
        default_value_t = webhook::RuleSettings::default().max_replicas,
        value_parser = clap::value_parser!(i32).range(0..)
    )]
    pub max_replicas: i32,
    /// A policy name that `policy.sandbox.opensandbox.io/<decision>` annotations may use (repeat
    /// for several).
    #[arg(long = "policy-name")]
    pub policy_names: Vec<String>,
    /// Username the controller authenticates as (e.g.
    /// `system:serviceaccount:opensandbox-system:sandbox-controller`). Only it may write the
    /// controller's ledger annotations, and its requests skip the webhook (matchConditions), so a
    /// webhook outage never blocks the controller's own writes. Default: the identity this process
    /// authenticates as (a SelfSubjectReview at start).
    #[arg(long = "controller-username", env = "CONTROLLER_USERNAME")]
    pub controller_username: Option<String>,
    /// Largest AdmissionReview body accepted, in bytes.
    #[arg(
        long = "webhook-max-body-bytes",
        default_value_t = webhook::Limits::default().max_body_bytes
    )]
    pub max_body_bytes: usize,
}

/// Where the webhook's serving certificate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CertSource {
    /// A fresh CA and certificate made at start.
    Generate,
    /// The files in the certificate directory, as they are.
    Files,
}

/// How the webhook's ValidatingWebhookConfiguration is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RegistrationMode {
    /// Register https://<listen address>/validate.
    Url,
    /// Register the --webhook-service Service.
    Service,
    /// Leave it to manifests.
    None,
}

/// The `--endpoints-format` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EndpointsFormatArg {
    /// IP strings for OpenSandbox server's BatchSandboxes, objects for the rest.
    Auto,
    /// `[{"sandbox_id":"0","ip":"..."}, ...]`, as the spec shows.
    Objects,
    /// `["ip0", ...]`, the plain list OpenSandbox's server reads.
    Ips,
}

impl From<EndpointsFormatArg> for EndpointsFormat {
    fn from(format: EndpointsFormatArg) -> Self {
        match format {
            EndpointsFormatArg::Auto => EndpointsFormat::Auto,
            EndpointsFormatArg::Objects => EndpointsFormat::Objects,
            EndpointsFormatArg::Ips => EndpointsFormat::Ips,
        }
    }
}

impl From<RunArgs> for RunConfig {
    fn from(args: RunArgs) -> Self {
        let controller_namespace = args.webhook_args.controller_namespace.clone();
        let mut webhook = WebhookSettings::from(args.webhook_args);
        // `run --namespace N` scopes the webhook to N too, unless it was scoped otherwise.
        webhook.only_namespace = webhook.only_namespace.or_else(|| args.namespace.clone());
        RunConfig {
            controller: ControllerConfig {
                executor: ExecutorSettings {
                    image: args.executor_image,
                    signing_key: None,
                    pool_injection: args.pool_executor_injection,
                },
                namespace: args.namespace,
                concurrency: args.concurrency.max(1),
                endpoints_format: args.endpoints_format.into(),
                resync: Duration::from_secs(args.resync_seconds.max(1)),
                fence: Default::default(),
                cleanup_deadline: Duration::from_secs(args.cleanup_deadline_seconds),
                pool_status_writes_per_second: args.pool_status_writes_per_second,
            },
            executor_key: match (
                args.executor_signing_key_file,
                args.executor_signing_key_secret,
            ) {
                (Some(path), _) => ExecutorKeySource::File(path),
                (None, Some(name)) => ExecutorKeySource::Secret {
                    namespace: controller_namespace,
                    name,
                },
                (None, None) => ExecutorKeySource::None,
            },
            health_addr: args.health_addr,
            leader: args.leader_elect.then(|| LeaderConfig {
                namespace: args.leader_election_namespace,
                lease_name: args.lease_name,
                identity: crate::runtime::identity(),
                lease_duration: Duration::from_secs(args.lease_duration_seconds),
            }),
            webhook: args.webhook.then_some(webhook),
            policy: PolicySettings::from(&args.policy),
            api_protocol: args.api_protocol,
        }
    }
}

impl From<&PolicyArgs> for PolicySettings {
    fn from(args: &PolicyArgs) -> Self {
        PolicySettings {
            native: args.policy_engine == PolicyEngineKind::Native,
            namespace: args.policy_namespace.clone(),
            dir: args.policy_dir.clone(),
            poll_interval: Duration::from_secs(args.policy_poll_seconds.max(1)),
            limits: Limits {
                fuel: args.policy_fuel,
                timeout: Duration::from_millis(args.policy_timeout_ms.max(1)),
                memory_bytes: args.policy_memory_mib.max(1) << 20,
                ..Limits::default()
            },
        }
    }
}

impl From<WebhookArgs> for WebhookSettings {
    fn from(args: WebhookArgs) -> Self {
        WebhookSettings {
            listen: args.listen,
            tls: webhook::TlsSettings {
                cert_dir: args.cert_dir,
                generate_for: (args.certs == CertSource::Generate).then_some(args.sans),
                reload_interval: Duration::from_secs(args.reload_seconds.max(1)),
            },
            registration: match args.registration {
                RegistrationMode::Url => crate::runtime::RegistrationSettings::Url,
                RegistrationMode::Service => {
                    crate::runtime::RegistrationSettings::Service(args.service)
                }
                RegistrationMode::None => crate::runtime::RegistrationSettings::None,
            },
            configuration_name: args.configuration_name,
            only_namespace: args.only_namespace,
            controller_namespace: args.controller_namespace,
            keep_registration: args.keep_registration,
            timeout_seconds: args.timeout_seconds,
            max_replicas: args.max_replicas,
            policy_names: args.policy_names,
            max_body_bytes: args.max_body_bytes,
            controller_username: args.controller_username,
        }
    }
}

/// The command-line reference (`docs/cli.md`): the long help of every subcommand.
pub fn reference() -> String {
    fn walk(command: &mut clap::Command, path: &str, out: &mut String) {
        if command.is_hide_set() {
            return;
        }
        // Environment values would make the text depend on the machine that renders it.
        let mut shown = command.clone().mut_args(|arg| arg.hide_env_values(true));
        let help = shown.render_long_help().to_string();
        let help: Vec<&str> = help.trim_end().lines().map(str::trim_end).collect();
        out.push_str(&format!(
            "## `{path}`\n\n```text\n{}\n```\n\n",
            help.join("\n")
        ));
        let names: Vec<String> = command
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .filter(|name| name != "help")
            .collect();
        for name in names {
            if let Some(sub) = command.find_subcommand_mut(&name) {
                walk(sub, &format!("{path} {name}"), out);
            }
        }
    }
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    let mut out = String::from(
        "# Command line\n\nGenerated from the flag definitions in `src/cli.rs` by \
         `SANDBOX_UPDATE_DOCS=1 cargo test -p sandbox-controller --lib cli`; a test fails when \
         this file is stale.\n\n",
    );
    walk(&mut command, "sandbox-controller", &mut out);
    out.trim_end().to_string() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_are_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn docs_cli_md_is_generated_from_these_flags() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md");
        let expected = reference();
        if std::env::var_os("SANDBOX_UPDATE_DOCS").is_some_and(|v| v == "1") {
            std::fs::write(&path, &expected).expect("writing docs/cli.md");
        }
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            actual == expected,
            "docs/cli.md is stale: run `SANDBOX_UPDATE_DOCS=1 cargo test -p sandbox-controller --lib cli`"
        );
    }

    #[test]
    fn run_flags_become_the_runtime_config() {
        let cli = Cli::try_parse_from([
            "sandbox-controller",
            "run",
            "--namespace",
            "team-a",
            "--leader-elect",
            "--leader-election-namespace",
            "ops",
            "--webhook",
            "--endpoints-format",
            "ips",
            "--policy-engine",
            "native",
        ])
        .expect("valid flags");
        let Command::Run(args) = cli.command else {
            panic!("not the run subcommand");
        };
        let config = RunConfig::from(args);
        assert_eq!(config.controller.namespace.as_deref(), Some("team-a"));
        assert_eq!(config.controller.endpoints_format, EndpointsFormat::Ips);
        let leader = config.leader.expect("leader election on");
        assert_eq!(leader.namespace, "ops");
        let webhook = config.webhook.expect("webhook on");
        assert_eq!(
            webhook.only_namespace.as_deref(),
            Some("team-a"),
            "run --namespace scopes the webhook too"
        );
        assert!(config.policy.native);
    }

    #[test]
    fn one_worker_thread_unless_told_and_never_none() {
        let worker_threads = |extra: &[&str]| {
            let cli = Cli::try_parse_from(["sandbox-controller", "run"].iter().chain(extra))?;
            let Command::Run(args) = cli.command else {
                panic!("not the run subcommand");
            };
            Ok::<_, clap::Error>(args.worker_threads)
        };
        assert_eq!(worker_threads(&[]).expect("no flag"), 1);
        assert_eq!(worker_threads(&["--worker-threads", "4"]).expect("4"), 4);
        assert!(worker_threads(&["--worker-threads", "0"]).is_err());
    }
}
