//! `sandbox-local-executors`: a real task executor for every local (kwok) pod that needs one.
//! Running pods with a `task-executor` container and a 127.x.y.z pod IP get
//! `sandbox-task-executor` bound to `<podIP>:5758`, stopped again when the pod goes away.
//! `deploy/local/cluster.sh up` starts it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sandbox_controller::runtime::{self, LogFormat};
use sandbox_devtools::runner;

/// Runs a real task executor for every local (kwok) pod that needs one.
#[derive(Parser)]
#[command(version, about)]
struct Args {
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
    /// Port the executors listen on, on each pod's IP.
    #[arg(long, default_value_t = sandbox_executor::EXECUTOR_PORT)]
    port: u16,
    /// Seconds between SIGTERM and SIGKILL when a task times out or is stopped.
    #[arg(long, default_value_t = 10)]
    kill_grace_seconds: u64,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    runtime::init_logging(args.log_format);
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
        kill_grace: Duration::from_secs(args.kill_grace_seconds),
    };
    runner::run(client, config, runtime::shutdown_signal()).await?;
    Ok(())
}
