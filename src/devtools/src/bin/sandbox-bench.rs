//! Claim benchmarks against a live cluster (the local control plane): starts one
//! namespace-scoped `sandbox-controller` (refusing when another controller reconciles the
//! namespace), measures claims from a warm pool and, with `--scale`, in a scene of thousands of
//! pool pods; prints the figures and writes them as JSON. `sandbox-bench plot` renders the
//! latency distributions of one or two JSON files as SVG. See docs/benchmarks.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use kube::{Client, Config};
use sandbox_devtools::bench::{plot, report::Report, run};

#[derive(Parser)]
#[command(
    about = "Benchmark claims against the cluster in $KUBECONFIG",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Render latency distributions (CDFs) of one or two `--json` files as SVG, one per figure.
    Plot(PlotArgs),
}

#[derive(Args)]
struct PlotArgs {
    /// Report files, e.g. the before and the after of a change; each becomes one line per plot,
    /// labelled with its file stem.
    #[arg(required = true, num_args = 1..=4)]
    reports: Vec<PathBuf>,
    /// Directory for the SVG files.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Runs of the normal scene; latency percentiles pool every run's claims, other figures are
    /// medians. 0 skips the normal scene.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Claims made one at a time in each run.
    #[arg(long, default_value_t = 50)]
    sequential_claims: usize,
    /// The controller binary (default: `sandbox-controller` beside this one).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Port (on 127.0.0.1) for the controller's metrics endpoint.
    #[arg(long, default_value_t = 18191)]
    metrics_port: u16,
    /// Seconds to watch the probe Pool for marks of another controller before starting ours.
    #[arg(long, default_value_t = 5)]
    probe_seconds: u64,
    /// Also run the scale scene: many pools full of pods, live batches, claims and releases
    /// flowing; adds kwok nodes when the cluster's cannot hold the pods.
    #[arg(long)]
    scale: bool,
    /// Pools of the scale scene.
    #[arg(long, default_value_t = 50)]
    pools: usize,
    /// Pods in each pool of the scale scene.
    #[arg(long, default_value_t = 200)]
    pods_per_pool: usize,
    /// Batches (`replicas: 1`) holding pods throughout the scale scene.
    #[arg(long, default_value_t = 1000)]
    live_batches: usize,
    /// Background releases and claims per second while the scale scene is measured.
    #[arg(long, default_value_t = 5.0)]
    churn_per_second: f64,
    /// Write every figure, with the per-claim samples, to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Plot(args)) => plot_reports(&args),
        None => bench(cli.run).await,
    }
}

fn plot_reports(args: &PlotArgs) -> anyhow::Result<()> {
    let reports = args
        .reports
        .iter()
        .map(|path| {
            let label = path.file_stem().map_or_else(
                || path.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            );
            Report::read(path).map(|r| (label, r))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for path in plot::render(&reports, &args.out)? {
        println!("{}", path.display());
    }
    Ok(())
}

async fn bench(args: RunArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The bench reads its controller's counters from this port: a process already on it (a
    // controller left over from an earlier run) would answer in its place.
    if let Err(error) = std::net::TcpListener::bind(("127.0.0.1", args.metrics_port)) {
        bail!(
            "127.0.0.1:{} (--metrics-port) is taken ({error}): another process, perhaps a controller left from an earlier run, would answer for this run's controller; stop it or pick another port",
            args.metrics_port
        );
    }
    let config = Config::infer()
        .await
        .context("reading the cluster in $KUBECONFIG")?;
    // The bench reads the apiserver's /metrics and floods it with writes: local clusters only.
    let loopback = config.cluster_url.host().is_some_and(|h| {
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    if !loopback {
        bail!(
            "the cluster in $KUBECONFIG is at {}; the bench runs against a local control plane on 127.0.0.0/8 only",
            config.cluster_url
        );
    }
    let client = Client::try_from(config)?;
    let controller = match args.controller {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("sandbox-controller"),
    };
    let settings = run::Settings {
        runs: args.runs,
        sequential_claims: args.sequential_claims,
        controller,
        metrics_port: args.metrics_port,
        probe_timeout: Duration::from_secs(args.probe_seconds),
        scale: args.scale.then_some(run::ScaleSettings {
            pools: args.pools.max(1),
            pods_per_pool: args.pods_per_pool.max(1),
            live_batches: args.live_batches,
            churn_per_second: args.churn_per_second,
        }),
        json: args.json,
    };
    run::run(client, settings).await?;
    Ok(())
}
