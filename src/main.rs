use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sandbox_controller::api;
use sandbox_controller::controller::{self, ControllerConfig};
use sandbox_controller::domain::endpoints::EndpointsFormat;
use sandbox_controller::policy::NativePolicies;

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

#[derive(Subcommand)]
enum Command {
    /// Run the controller against the cluster in $KUBECONFIG (or the in-cluster config).
    Run(RunArgs),
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
    /// Format of the `sandbox.opensandbox.io/endpoints` annotation: `objects` as in the spec, or
    /// `ips`, the plain list of IP strings OpenSandbox's server reads.
    #[arg(long, value_enum, default_value_t = EndpointsFormat::Objects)]
    endpoints_format: EndpointsFormat,
    /// Seconds between periodic re-checks of every object.
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Crdgen { out_dir } => crdgen(&out_dir),
        Command::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(args)),
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
    let config = ControllerConfig {
        namespace: args.namespace,
        concurrency: args.concurrency.max(1),
        endpoints_format: args.endpoints_format,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
    };
    controller::run(client, Arc::new(NativePolicies), config, shutdown_signal()).await
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
