//! `sandbox-task-executor`: runs a sandbox's process tasks and reports their state over HTTP
//! (OpenSandbox-compatible `POST /setTasks`, `GET /getTasks`, `GET /health` on port 5758).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sandbox_executor::auth::{Auth, load_token};
use sandbox_executor::daemon::{self, ExecutorConfig};
use sandbox_executor::shim::{self, ShimConfig};
use sandbox_executor::{DEFAULT_DATA_DIR, EXECUTOR_PORT, TOKEN_ENV};

/// Runs a sandbox's process tasks and reports their state over HTTP.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Supervises one task (started by the executor itself, not by hand).
    #[command(hide = true)]
    Shim(ShimArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; see --ready-file).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], EXECUTOR_PORT)), env = "TASK_EXECUTOR_LISTEN")]
    listen: SocketAddr,
    /// Directory for the task list, task results and task output; survives restarts.
    #[arg(long, default_value = DEFAULT_DATA_DIR, env = "TASK_EXECUTOR_DATA_DIR")]
    data_dir: PathBuf,
    /// File holding the bearer token clients must send. Without it the token is read from
    /// $SANDBOX_EXECUTOR_TOKEN.
    #[arg(long, env = "SANDBOX_EXECUTOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Accept requests without a token (for OpenSandbox clients that cannot send one).
    #[arg(long, conflicts_with = "token_file")]
    allow_unauthenticated: bool,
    /// Seconds between SIGTERM and SIGKILL when a task times out or is stopped.
    #[arg(long, default_value_t = 10)]
    kill_grace_seconds: u64,
    /// Stop every task before exiting. By default tasks keep running and a restarted executor
    /// resumes them.
    #[arg(long)]
    stop_tasks_on_exit: bool,
    /// Shut down once this process is no longer the executor's parent.
    #[arg(long)]
    parent_pid: Option<u32>,
    /// Write the bound address to this file once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Log output format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text", env = "LOG_FORMAT")]
    log_format: String,
}

#[derive(Args)]
struct ShimArgs {
    #[arg(long)]
    task_dir: PathBuf,
    #[arg(long)]
    grace_ms: u64,
    #[arg(long)]
    timeout_seconds: Option<u64>,
    #[arg(long)]
    working_dir: Option<PathBuf>,
    /// The program and its arguments, passed on exactly as given.
    #[arg(last = true, required = true)]
    argv: Vec<OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match cli.command {
        Some(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sandbox-task-executor: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Shim(args)) => {
            let config = ShimConfig {
                task_dir: args.task_dir,
                working_dir: args.working_dir,
                timeout: args.timeout_seconds.map(Duration::from_secs),
                grace: Duration::from_millis(args.grace_ms),
                argv: args.argv,
            };
            match runtime.block_on(shim::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    shim::report_failure(&error);
                    ExitCode::FAILURE
                }
            }
        }
        None => serve(cli.serve, runtime),
    }
}

fn serve(args: ServeArgs, runtime: tokio::runtime::Runtime) -> ExitCode {
    init_logging(&args.log_format);
    let auth = if args.allow_unauthenticated {
        tracing::warn!(
            "--allow-unauthenticated: anyone who can reach this port can run processes here"
        );
        Auth::Open
    } else {
        match load_token(args.token_file.as_deref(), std::env::var(TOKEN_ENV).ok()) {
            Ok(token) => Auth::token(&token),
            Err(error) => {
                tracing::error!(%error, "cannot start without a token");
                return ExitCode::FAILURE;
            }
        }
    };
    let shim_exe = match std::env::current_exe() {
        Ok(path) => path,
        Err(error) => {
            tracing::error!(%error, "cannot locate this executable to run task supervisors");
            return ExitCode::FAILURE;
        }
    };
    let config = ExecutorConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        auth,
        grace: Duration::from_secs(args.kill_grace_seconds),
        stop_tasks_on_exit: args.stop_tasks_on_exit,
        parent_pid: args.parent_pid,
        ready_file: args.ready_file,
        shim_exe,
    };
    let result = runtime.block_on(daemon::run(config));
    // Monitors of tasks that keep running must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "task executor failed");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
