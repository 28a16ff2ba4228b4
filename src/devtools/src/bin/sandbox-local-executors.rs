//! `sandbox-local-executors`: a real task executor for every local (kwok) pod that is a sandbox.
//! Running pods with a 127.x.y.z pod IP get `sandbox-task-executor` bound to that IP: the task API
//! on `:5758` for pods with a `task-executor` container, the command API of OpenSandbox's execd on
//! `:44772` for those and for pods of OpenSandbox's server; stopped again when the pod goes away.
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
    /// The controller's executor signing key (hex Ed25519 seed; pass the same file to the
    /// controller's --executor-signing-key-file); created with a fresh key, mode 0400, if
    /// missing. The executors get only its public half, written to
    /// `<state dir>/executor-public-key`. Default: `<state dir>/executor-signing-key`.
    #[arg(long)]
    signing_key_file: Option<PathBuf>,
    /// The `sandbox-task-executor` binary. Default: next to this binary.
    #[arg(long)]
    executor_bin: Option<PathBuf>,
    /// Port the executors' task API listens on, on each pod's IP.
    #[arg(long, default_value_t = sandbox_executor::EXECUTOR_PORT)]
    port: u16,
    /// Port of the command API (OpenSandbox's execd) on each pod's IP.
    #[arg(long, default_value_t = sandbox_executor::command::COMMAND_PORT)]
    command_port: u16,
    /// The access token file the command API requires (X-EXECD-ACCESS-TOKEN). Default: none, as
    /// OpenSandbox's SDK 1.1.1 sends none.
    #[arg(long)]
    command_token_file: Option<PathBuf>,
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
    let signing_key_file = args
        .signing_key_file
        .unwrap_or_else(|| state_dir.join("executor-signing-key"));
    let public_key_file = state_dir.join("executor-public-key");
    runner::ensure_key_files(&signing_key_file, &public_key_file)?;
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
    // Tasks run as an unprivileged user, who may not reach the state directory (a checkout under
    // a private home directory); their programs are linked where every user can reach them.
    let task_bin = std::env::temp_dir().join(format!(
        "sbx-task-bin-{:016x}",
        std::hash::BuildHasher::hash_one(
            &std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default(),
            &state_dir
        )
    ));
    let config = runner::RunnerConfig {
        state_dir,
        executor_bin,
        public_key_file,
        port: args.port,
        command_port: args.command_port,
        command_token_file: args.command_token_file,
        kill_grace: Duration::from_secs(args.kill_grace_seconds),
        task_bin: match runner::task_programs(&task_bin) {
            Ok(dir) => Some(dir),
            Err(error) => {
                tracing::warn!(%error, "cannot link programs for tasks; they use this PATH as it is");
                None
            }
        },
    };
    runner::run(client, config, runtime::shutdown_signal()).await?;
    Ok(())
}
