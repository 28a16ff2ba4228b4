//! `sandbox-task-executor`: runs a sandbox's process tasks and reports their state over HTTP
//! (OpenSandbox-compatible `POST /setTasks`, `GET /getTasks`, `GET /health` on port 5758), and
//! serves the command API of OpenSandbox's execd (`GET /ping`, `POST /command`, port 44772).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sandbox_executor::auth::{Auth, read_secret_file};
use sandbox_executor::command::ACCESS_TOKEN_ENV;
use sandbox_executor::credential::{self, PublicKey, Verifier};
use sandbox_executor::daemon::{self, ExecutorConfig};
use sandbox_executor::identity::{self, DEFAULT_TASK_USER, TaskIdentity};
use sandbox_executor::mounts::{self, BindMount};
use sandbox_executor::shim::{self, ShimConfig};
use sandbox_executor::{DEFAULT_DATA_DIR, EXECUTOR_PORT, POD_UID_ENV};

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
    /// Address of the task API (port 0 picks a free port; see --ready-file), or `none`.
    #[arg(long, default_value_t = Listen(Some(SocketAddr::from(([0, 0, 0, 0], EXECUTOR_PORT)))), value_parser = parse_listen, env = "TASK_EXECUTOR_LISTEN")]
    listen: Listen,
    /// Address of the command API of OpenSandbox's execd (its port is 44772), or `none`.
    #[arg(long, default_value_t = Listen(None), value_parser = parse_listen, env = "TASK_EXECUTOR_COMMAND_LISTEN")]
    command_listen: Listen,
    /// File holding the access token the command API requires in X-EXECD-ACCESS-TOKEN; it must
    /// not be readable by group or others (0400). Without it, none is required.
    /// ($EXECD_ACCESS_TOKEN is refused: a secret in the environment is readable in /proc.)
    #[arg(long)]
    command_token_file: Option<PathBuf>,
    /// Mount HOST_DIR at PATH for the executor and everything it runs, in a private mount
    /// namespace (for executors outside a container; repeatable).
    #[arg(long = "mount", value_name = "HOST_DIR:PATH")]
    mounts: Vec<BindMount>,
    /// Directory for the task list, task results and task output; survives restarts.
    #[arg(long, default_value = DEFAULT_DATA_DIR, env = "TASK_EXECUTOR_DATA_DIR")]
    data_dir: PathBuf,
    /// The controller's Ed25519 public key (64 hex digits): the task API accepts only requests
    /// it signed for this pod.
    #[arg(long, value_name = "HEX", env = "SANDBOX_EXECUTOR_PUBLIC_KEY")]
    controller_public_key: Option<PublicKey>,
    /// File holding the controller's public key, instead of --controller-public-key.
    #[arg(long, conflicts_with = "controller_public_key")]
    controller_public_key_file: Option<PathBuf>,
    /// This executor's pod UID (the downward API's metadata.uid): credentials signed for any
    /// other pod are refused.
    #[arg(long, env = POD_UID_ENV)]
    pod_uid: Option<String>,
    /// Accept task API requests without a credential (for OpenSandbox clients that cannot sign).
    #[arg(long, conflicts_with_all = ["controller_public_key", "controller_public_key_file"])]
    allow_unauthenticated: bool,
    /// The user tasks and commands run as, `UID:GID`, when the executor runs as root (an
    /// executor that is not root runs them as itself). A command request's own uid wins.
    #[arg(long, default_value = DEFAULT_TASK_USER, env = "TASK_EXECUTOR_TASK_USER")]
    task_user: TaskIdentity,
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
    /// The user the process runs as, UID:GID.
    #[arg(long)]
    run_as: Option<TaskIdentity>,
    /// The program and its arguments, passed on exactly as given.
    #[arg(last = true, required = true)]
    argv: Vec<OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.is_none() {
        init_logging(&cli.serve.log_format);
        // Before any thread exists: a user namespace can only be entered single-threaded.
        if let Err(error) = mounts::enter(&cli.serve.mounts, &cli.serve.data_dir.join(".mounts")) {
            let mounts: Vec<String> = cli.serve.mounts.iter().map(ToString::to_string).collect();
            tracing::error!(%error, ?mounts, "cannot set up the mounts; running without them");
        }
    }
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
                run_as: args.run_as,
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
    // What runs here must not read our memory or environment, even as the same uid.
    if let Err(error) = identity::make_undumpable() {
        tracing::warn!(%error, "cannot make the executor non-dumpable");
    }
    if std::env::var_os(ACCESS_TOKEN_ENV).is_some() {
        tracing::error!(
            "${ACCESS_TOKEN_ENV} is set: a secret in the environment can be read in /proc; put it in a file only its owner can read and pass --command-token-file"
        );
        return ExitCode::FAILURE;
    }
    let auth = match task_api_auth(&args) {
        Ok(auth) => auth,
        Err(message) => {
            tracing::error!("{message}");
            return ExitCode::FAILURE;
        }
    };
    let command_token = match &args.command_token_file {
        Some(path) => match read_secret_file(path) {
            Ok(token) => Some(token),
            Err(error) => {
                tracing::error!(%error, "cannot use the command API's token");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let task_identity = identity::effective(Some(args.task_user));
    match task_identity {
        Some(identity) => tracing::info!(%identity, "tasks and commands run as another user"),
        None => tracing::warn!(
            "not root: tasks and commands run as the executor's own user and can read its files"
        ),
    }
    let shim_exe = match std::env::current_exe() {
        Ok(path) => path,
        Err(error) => {
            tracing::error!(%error, "cannot locate this executable to run task supervisors");
            return ExitCode::FAILURE;
        }
    };
    let config = ExecutorConfig {
        listen: args.listen.0,
        command_listen: args.command_listen.0,
        command_token,
        data_dir: args.data_dir,
        auth,
        task_identity,
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

/// How the task API authenticates its callers.
fn task_api_auth(args: &ServeArgs) -> Result<Auth, String> {
    if args.listen.0.is_none() {
        return Ok(Auth::Open);
    }
    if args.allow_unauthenticated {
        tracing::warn!(
            "--allow-unauthenticated: anyone who can reach this port can run processes here"
        );
        return Ok(Auth::Open);
    }
    let key = match (
        &args.controller_public_key,
        &args.controller_public_key_file,
    ) {
        (Some(key), _) => *key,
        (None, Some(path)) => credential::read_key_file(path)
            .map_err(|e| format!("cannot read the controller's public key: {e}"))?,
        (None, None) => {
            return Err("no controller public key: pass --controller-public-key(-file), or run with --allow-unauthenticated".into());
        }
    };
    let pod_uid = args
        .pod_uid
        .as_deref()
        .map(str::trim)
        .filter(|uid| !uid.is_empty() && !uid.contains(char::is_whitespace))
        .ok_or_else(|| {
            format!(
                "no pod UID: pass --pod-uid or set ${POD_UID_ENV} (the downward API's metadata.uid)"
            )
        })?;
    Ok(Auth::Signed(Verifier::new(key, pod_uid)))
}

/// An address to listen on, or none (`none`).
#[derive(Clone, Copy, Debug)]
struct Listen(Option<SocketAddr>);

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("none"),
        }
    }
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    match s {
        "none" | "off" | "" => Ok(Listen(None)),
        _ => s
            .parse()
            .map(|addr| Listen(Some(addr)))
            .map_err(|e| format!("{s:?}: {e} (an address like 0.0.0.0:44772, or none)")),
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
