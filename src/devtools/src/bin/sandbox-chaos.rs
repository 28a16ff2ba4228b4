//! `sandbox-chaos`: drives pooled BatchSandbox allocations against a local cluster while the real
//! `sandbox-controller` runs behind a fault-injecting proxy, is killed, loses its apiserver, or is
//! replaced in a rolling update; checks the allocation record's invariants on every change it
//! sees, and prints per scenario: pods held by two batches, pods leaked, batches converged.
//!
//! Exits non-zero only when an invariant broke, a pod leaked or a batch did not converge; it
//! prints timings but never judges them. `src/devtools/chaos.sh` (`make chaos`) runs it against a
//! cluster of its own; docs/chaos.md explains the figures and how to replay a seed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Config, ResourceExt};
use sandbox_devtools::allocation_invariants::{self as invariants, Leak, Violation};
use sandbox_devtools::fault_proxy::{FaultConfig, FaultCounts, FaultProxy, Framing};
use sandbox_domain::api::{BatchSandbox, Pool};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Scenario {
    /// The proxy drops responses, resets connections, adds latency and stalls watches.
    Faults,
    /// `kill -9` of the controller at random moments, restarted each time.
    Kills,
    /// kube-apiserver stopped and started again mid-run.
    ApiserverRestart,
    /// Two controllers with leader election overlap; the old one is stopped after the new starts.
    RollingUpdate,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Faults => "faults",
            Self::Kills => "kills",
            Self::ApiserverRestart => "apiserver-restart",
            Self::RollingUpdate => "rolling-update",
        }
    }
}

#[derive(Parser)]
#[command(about = "Fault suite for the allocation record (loopback only)")]
struct Args {
    /// Kubeconfig of the cluster (its apiserver must be on 127.0.0.1; its serving certificate
    /// must name 127.0.0.1, as deploy/local/cluster.sh makes it).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// The controller binary (default: `sandbox-controller` beside this one).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Pooled and non-pooled BatchSandboxes to create, in all, split evenly over the scenarios.
    #[arg(long, default_value_t = 1000)]
    allocations: usize,
    /// Controller kills in the `kills` scenario.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Rolling updates in the `rolling-update` scenario.
    #[arg(long, default_value_t = 2)]
    rolling_updates: usize,
    /// How long a stalled connection hears nothing from the apiserver.
    #[arg(long, default_value_t = 90)]
    stall_seconds: u64,
    /// Seed of every random choice (faults, workload, kill moments); printed, so a run can be
    /// replayed. Default: from the clock.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "faults,kills,apiserver-restart,rolling-update"
    )]
    scenarios: Vec<Scenario>,
    /// deploy/local/cluster.sh of the running cluster (for `apiserver-restart`), with SBX_DEV_DIR
    /// in the environment.
    #[arg(long)]
    cluster_script: Option<PathBuf>,
    /// Where the proxy listens (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    proxy_listen: SocketAddr,
    /// Two loopback ports for the controllers' health endpoints (two run at once in a rolling
    /// update).
    #[arg(long, value_delimiter = ',', default_value = "18291,18292")]
    health_ports: Vec<u16>,
    /// At most this many BatchSandboxes alive at once.
    #[arg(long, default_value_t = 16)]
    max_live: usize,
    /// Seconds a scenario waits for its batches to converge once the disruptions end.
    #[arg(long, default_value_t = 180)]
    converge_seconds: u64,
    /// Directory for the controllers' logs (default: a temporary one, kept).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Report pods a pool still counts as allocated 60 s after their batches are gone, but do not
    /// fail on them (pods still held after a forced pool reconcile always fail).
    #[arg(long)]
    tolerate_held_after_release: bool,
}

/// Everything one scenario measured.
#[derive(Default)]
struct Figures {
    scenario: &'static str,
    created: usize,
    pods_requested: usize,
    scale_downs: usize,
    deletions: usize,
    driver_errors: usize,
    disruptions: Vec<String>,
    faults: FaultCounts,
    /// Violations by their text, with when they were first seen (seconds into the scenario).
    violations: BTreeMap<String, (Violation, f64)>,
    batches_at_end: usize,
    converged: usize,
    not_converged: Vec<String>,
    deleted: (usize, usize),
    pools_drained: (usize, usize),
    leaks: Vec<Leak>,
    /// Pods the pools still counted as allocated 60 s after every batch was gone.
    held_after_release: i32,
    /// The same after a pool reconcile forced by touching the pools.
    held_after_reconcile: i32,
    held_detail: Vec<String>,
    elapsed: Duration,
    converge_time: Duration,
}

impl Figures {
    fn double_held(&self) -> BTreeSet<String> {
        self.violations
            .values()
            .filter_map(|(v, _)| match v {
                Violation::PodInSeveralLedgers { pod, .. } => Some(pod.clone()),
                _ => None,
            })
            .collect()
    }

    fn leaked(&self) -> usize {
        self.leaks.len() + usize::try_from(self.held_after_reconcile).unwrap_or(0)
    }

    fn failed(&self, tolerate_held_after_release: bool) -> bool {
        !self.violations.is_empty()
            || self.leaked() > 0
            || (self.held_after_release > 0 && !tolerate_held_after_release)
            || self.converged < self.batches_at_end
            || self.deleted.0 < self.deleted.1
            || self.pools_drained.0 < self.pools_drained.1
    }

    fn print(&self) {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for (v, _) in self.violations.values() {
            *kinds.entry(v.kind()).or_default() += 1;
        }
        println!("--- scenario {}: {:.0?}", self.scenario, self.elapsed);
        println!(
            "  workload: {} batches created ({} pods asked for), {} scale-downs, {} deletions, {} driver API errors",
            self.created, self.pods_requested, self.scale_downs, self.deletions, self.driver_errors
        );
        if !self.disruptions.is_empty() {
            println!(
                "  disruptions ({}): {}",
                self.disruptions.len(),
                self.disruptions.join("; ")
            );
        }
        let f = self.faults;
        if f.connections > 0 {
            println!(
                "  proxy: {} connections, {} requests; faults: {} dropped responses, {} resets, {} slow connections, {} stalls",
                f.connections,
                f.requests,
                f.dropped_responses,
                f.resets,
                f.delayed_connections,
                f.stalls
            );
        }
        println!(
            "  pods held by two batches: {} (must be 0)",
            self.double_held().len()
        );
        println!("  pods leaked: {} (must be 0)", self.leaked());
        if self.held_after_release > 0 {
            println!(
                "  pods still held 60 s after their batches were gone: {} (must be 0)",
                self.held_after_release
            );
        }
        println!(
            "  batches converged: {}/{} in {:.1?}; deleted {}/{}; pools drained {}/{}",
            self.converged,
            self.batches_at_end,
            self.converge_time,
            self.deleted.0,
            self.deleted.1,
            self.pools_drained.0,
            self.pools_drained.1
        );
        println!(
            "  invariant violations: {} {:?}",
            self.violations.len(),
            kinds
        );
        for (text, (_, at)) in self.violations.iter().take(20) {
            println!("    at {at:.1}s: {text}");
        }
        for leak in self.leaks.iter().take(20) {
            println!("    leak: {leak}");
        }
        if self.held_after_release > 0 {
            println!(
                "    pools still count {} pod(s) as allocated 60 s after every batch is gone; {} after a forced pool reconcile",
                self.held_after_release, self.held_after_reconcile
            );
            for line in &self.held_detail {
                println!("      {line}");
            }
        }
        for name in self.not_converged.iter().take(20) {
            println!("    not converged: {name}");
        }
    }
}

/// The run's fixed parts: clients, binaries, the proxy.
struct Run {
    args: Args,
    client: Client,
    controller_bin: PathBuf,
    proxied_kubeconfig: PathBuf,
    proxy: FaultProxy,
    log_dir: PathBuf,
}

/// A controller process; killed (SIGKILL) when dropped.
struct Controller {
    child: Child,
    health: SocketAddr,
    label: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    if args.health_ports.len() < 2 {
        bail!("--health-ports needs two ports");
    }
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &KubeConfigOptions::default())
        .await
        .context("loading the kubeconfig")?;
    let upstream = loopback_addr(&config.cluster_url.to_string())?;
    let client = Client::try_from(config)?;

    let faults = FaultConfig {
        seed,
        framing: Framing::Tls,
        drop_response: 0.04,
        reset: 0.02,
        latency_conn: 0.2,
        latency: (Duration::from_millis(20), Duration::from_millis(400)),
        stall_conn: 0.3,
        stall_after: (Duration::from_secs(2), Duration::from_secs(20)),
        stall: Duration::from_secs(args.stall_seconds),
    };
    let proxy = FaultProxy::start(args.proxy_listen, upstream, faults).await?;
    proxy.set_enabled(false);
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("sandbox-chaos-{seed}")),
    };
    std::fs::create_dir_all(&log_dir)?;
    let proxied_kubeconfig = log_dir.join("kubeconfig-via-proxy.json");
    write_proxied_kubeconfig(kubeconfig, proxy.local_addr(), &proxied_kubeconfig)?;
    let controller_bin = match &args.controller {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("sandbox-controller"),
    };
    if args.scenarios.contains(&Scenario::ApiserverRestart) && args.cluster_script.is_none() {
        bail!("the apiserver-restart scenario needs --cluster-script");
    }

    let per_scenario = args.allocations.div_ceil(args.scenarios.len().max(1));
    println!(
        "sandbox-chaos: seed {seed} (replay: --seed {seed}); scenarios {:?}; {per_scenario} batches each; {} kills; {} rolling update(s); stalls of {} s",
        args.scenarios.iter().map(|s| s.name()).collect::<Vec<_>>(),
        args.kills,
        args.rolling_updates,
        args.stall_seconds
    );
    println!(
        "  apiserver {upstream} via the fault proxy on {}; controller logs in {}",
        proxy.local_addr(),
        log_dir.display()
    );
    let (expected, at_most) = budget(&args, per_scenario);
    println!(
        "  budget: about {} s expected, {} s at most (every deadline: workload {} s, converge {} s, delete 120 s, release 60 s, drain 90 s per scenario)",
        expected.as_secs(),
        at_most.as_secs(),
        workload_deadline(&args, per_scenario).as_secs(),
        args.converge_seconds
    );

    let run = Run {
        args,
        client,
        controller_bin,
        proxied_kubeconfig,
        proxy,
        log_dir,
    };
    let started = Instant::now();
    let mut all = Vec::new();
    for (i, scenario) in run.args.scenarios.clone().into_iter().enumerate() {
        let figures = run_scenario(&run, scenario, per_scenario, seed.wrapping_add(i as u64))
            .await
            .with_context(|| format!("scenario {}", scenario.name()))?;
        figures.print();
        all.push(figures);
    }
    println!(
        "=== sandbox-chaos summary (seed {seed}, {:.0?})",
        started.elapsed()
    );
    let mut failed = false;
    for f in &all {
        println!(
            "  {:<18} batches {:>5}  disruptions {:>3}  faults {:>4}  violations {:>3}  pods held by two batches {:>3}  pods leaked {:>3}  held 60 s after release {:>3}  converged {}/{}",
            f.scenario,
            f.created,
            f.disruptions.len(),
            f.faults.dropped_responses
                + f.faults.resets
                + f.faults.delayed_connections
                + f.faults.stalls,
            f.violations.len(),
            f.double_held().len(),
            f.leaked(),
            f.held_after_release,
            f.converged,
            f.batches_at_end
        );
        failed |= f.failed(run.args.tolerate_held_after_release);
    }
    if failed {
        println!("FAILED: the allocation record broke under faults (replay with --seed {seed})");
        std::process::exit(1);
    }
    println!("OK: no violations, no leaks, every batch converged");
    Ok(())
}

/// How long a scenario's workload lasts at least: the fault scenario long enough for a stall to
/// play out in full, the kill and rolling-update scenarios long enough for the controller to work
/// between disruptions.
fn min_duration(args: &Args, scenario: Scenario, batches: usize) -> Duration {
    let pace = Duration::from_millis(60 * batches as u64);
    match scenario {
        Scenario::Faults => Duration::from_secs(args.stall_seconds + 30),
        Scenario::Kills => pace.max(Duration::from_secs(3 * args.kills as u64)),
        Scenario::RollingUpdate => pace.max(Duration::from_secs(10 * args.rolling_updates as u64)),
        Scenario::ApiserverRestart => pace.max(Duration::from_secs(20)),
    }
}

/// When a scenario stops creating batches even if it has not created them all.
fn workload_deadline(args: &Args, per_scenario: usize) -> Duration {
    Duration::from_secs(args.stall_seconds + 60 + per_scenario as u64 / 2)
}

/// (expected, at most): the expected length assumes a second per ten batches beyond the pacing
/// and half a minute to converge and clean up; the bound adds up every deadline.
fn budget(args: &Args, per_scenario: usize) -> (Duration, Duration) {
    let mut expected = Duration::ZERO;
    let mut at_most = Duration::ZERO;
    for &scenario in &args.scenarios {
        expected += min_duration(args, scenario, per_scenario)
            .max(Duration::from_millis(100 * per_scenario as u64))
            + Duration::from_secs(30);
        at_most += workload_deadline(args, per_scenario)
            + Duration::from_secs(args.converge_seconds + 120 + 60 + 90);
    }
    (expected, at_most)
}

/// The apiserver's address from its URL; only loopback is accepted.
fn loopback_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("https://")
        .context("the apiserver URL must be https://")?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = host_port
        .parse()
        .with_context(|| format!("the apiserver must be at an IP:port, not {host_port}"))?;
    if !addr.ip().is_loopback() {
        bail!(
            "the apiserver {addr} is not on loopback; sandbox-chaos only runs against a local cluster"
        );
    }
    Ok(addr)
}

/// The same kubeconfig with every cluster's server pointing at the proxy. TLS passes through, so
/// the apiserver's certificate must name 127.0.0.1.
fn write_proxied_kubeconfig(
    mut kubeconfig: Kubeconfig,
    proxy: SocketAddr,
    path: &Path,
) -> anyhow::Result<()> {
    for cluster in &mut kubeconfig.clusters {
        if let Some(c) = cluster.cluster.as_mut() {
            c.server = Some(format!("https://{proxy}"));
        }
    }
    std::fs::write(path, serde_json::to_vec_pretty(&kubeconfig)?)?;
    Ok(())
}

impl Run {
    fn spawn_controller(
        &self,
        namespace: &str,
        slot: usize,
        leader_elect: bool,
        label: &str,
    ) -> anyhow::Result<Controller> {
        let health: SocketAddr = ([127, 0, 0, 1], self.args.health_ports[slot % 2]).into();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("controller-{namespace}.log")))?;
        let mut cmd = Command::new(&self.controller_bin);
        cmd.args(["run", "--namespace", namespace])
            .args(["--health-addr", &health.to_string()])
            // Pool pods without the task executor: the suite is about the allocation record.
            .args(["--pool-executor-injection", "annotated"]);
        if leader_elect {
            cmd.args([
                "--leader-elect",
                "--leader-election-namespace",
                namespace,
                "--lease-duration-seconds",
                "15",
            ]);
        }
        let child = cmd
            .env("KUBECONFIG", &self.proxied_kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("SBX_CHAOS_CONTROLLER_LOG")
                    .unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .env("LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.controller_bin.display()))?;
        Ok(Controller {
            child,
            health,
            label: label.to_string(),
        })
    }
}

/// Waits until `path` on the controller's health address answers 200; false after `timeout`.
async fn wait_endpoint(controller: &mut Controller, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = controller.child.try_wait() {
            return false;
        }
        if http_ok(controller.health, path).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use http_body_util::Empty;
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", addr.to_string())
            .body(Empty::<hyper::body::Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        Some(response.status().is_success())
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Per pod: every batch whose ledger named it, with the second it was first seen there.
type LedgerHistory = BTreeMap<String, Vec<(String, f64)>>;

/// Records every violation the invariant checker finds, on every change the watches deliver.
struct Monitor {
    found: Arc<Mutex<BTreeMap<String, (Violation, f64)>>>,
    /// Per pod: every batch whose ledger named it, with the second it was first seen there.
    history: Arc<Mutex<LedgerHistory>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_monitor(client: &Client, ns: &str, started: Instant) -> Monitor {
    let (pods, pods_w) = reflector::store();
    let (batches, batches_w) = reflector::store();
    let (pools, pools_w) = reflector::store();
    let found = Arc::new(Mutex::new(BTreeMap::new()));
    let cfg = watcher::Config::default();
    let pod_events = watcher(Api::<Pod>::namespaced(client.clone(), ns), cfg.clone())
        .default_backoff()
        .reflect(pods_w)
        .map(|_| ())
        .boxed();
    let batch_events = watcher(
        Api::<BatchSandbox>::namespaced(client.clone(), ns),
        cfg.clone(),
    )
    .default_backoff()
    .reflect(batches_w)
    .map(|_| ())
    .boxed();
    let pool_events = watcher(Api::<Pool>::namespaced(client.clone(), ns), cfg)
        .default_backoff()
        .reflect(pools_w)
        .map(|_| ())
        .boxed();
    let history: Arc<Mutex<LedgerHistory>> = Arc::default();
    let (p, b, q, f, h) = (pods, batches, pools, found.clone(), history.clone());
    let task = tokio::spawn(async move {
        let mut events = stream::select(stream::select(pod_events, batch_events), pool_events);
        while events.next().await.is_some() {
            let pods: Vec<Pod> = p.state().iter().map(|x| (**x).clone()).collect();
            let batches: Vec<BatchSandbox> = b.state().iter().map(|x| (**x).clone()).collect();
            let pools: Vec<Pool> = q.state().iter().map(|x| (**x).clone()).collect();
            let at = started.elapsed().as_secs_f64();
            {
                let mut history = h.lock().unwrap_or_else(|e| e.into_inner());
                for batch in &batches {
                    let name = batch.name_any();
                    for pod in invariants_ledger(batch)
                        .into_iter()
                        .filter(|p| !p.is_empty())
                    {
                        let seen = history.entry(pod).or_default();
                        if !seen.iter().any(|(b, _)| *b == name) {
                            seen.push((name.clone(), at));
                        }
                    }
                }
            }
            let violations = invariants::check(&pods, &batches, &pools);
            if violations.is_empty() {
                continue;
            }
            let mut found = f.lock().unwrap_or_else(|e| e.into_inner());
            for v in violations {
                found.entry(v.to_string()).or_insert((v, at));
            }
        }
    });
    Monitor {
        found,
        history,
        task,
    }
}

/// Moments (batch-creation counts) at which the disruptions happen, drawn from the seed.
fn disruption_points(rng: &mut fastrand::Rng, count: usize, total: usize) -> Vec<usize> {
    let mut points: Vec<usize> = (0..count).map(|_| rng.usize(1..total.max(2))).collect();
    points.sort_unstable();
    points
}

const POOLS: [&str; 3] = ["alpha", "beta", "gamma"];

async fn run_scenario(
    run: &Run,
    scenario: Scenario,
    batches_to_create: usize,
    seed: u64,
) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let ns = format!("chaos-{}-{}", scenario.name(), seed % 100_000);
    println!(
        "--- scenario {} in namespace {ns} (workload seed {seed})",
        scenario.name()
    );
    let client = run.client.clone();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?,
        )
        .await
        .with_context(|| format!("creating namespace {ns}"))?;
    let pools: Api<Pool> = Api::namespaced(client.clone(), &ns);
    let batches: Api<BatchSandbox> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for name in POOLS {
        pools.create(&PostParams::default(), &pool(name)).await?;
    }
    let monitor = start_monitor(&client, &ns, started);
    let mut figures = Figures {
        scenario: scenario.name(),
        ..Default::default()
    };
    let leader_elect = scenario == Scenario::RollingUpdate;
    let mut current = run.spawn_controller(&ns, 0, leader_elect, "controller-0")?;
    let mut slot = 0;
    if !wait_endpoint(&mut current, "/readyz", Duration::from_secs(60)).await {
        bail!(
            "the controller did not become ready; see {}",
            run.log_dir.display()
        );
    }
    let faults_before = run.proxy.counts();
    if scenario == Scenario::Faults {
        run.proxy.set_enabled(true);
    }

    let points = match scenario {
        Scenario::Faults => vec![],
        Scenario::Kills => disruption_points(&mut rng, run.args.kills, batches_to_create),
        Scenario::ApiserverRestart => vec![batches_to_create / 2],
        Scenario::RollingUpdate => {
            disruption_points(&mut rng, run.args.rolling_updates, batches_to_create)
        }
    };
    let mut next_point = 0;
    let min_duration = min_duration(&run.args, scenario, batches_to_create);
    let deadline = started + workload_deadline(&run.args, batches_to_create);
    let mut live: Vec<(String, i32)> = Vec::new();
    let mut restart: Option<tokio::task::JoinHandle<anyhow::Result<String>>> = None;
    let workload_start = Instant::now();
    while figures.created < batches_to_create && Instant::now() < deadline {
        while next_point < points.len() && figures.created >= points[next_point] {
            next_point += 1;
            match scenario {
                Scenario::Kills => {
                    // A random moment within the step, not only right after a create.
                    tokio::time::sleep(Duration::from_millis(rng.u64(0..200))).await;
                    let _ = current.child.kill();
                    let _ = current.child.wait();
                    let at = workload_start.elapsed();
                    current = run.spawn_controller(&ns, 0, false, "controller")?;
                    figures
                        .disruptions
                        .push(format!("kill -9 at {:.1}s", at.as_secs_f64()));
                }
                Scenario::ApiserverRestart => {
                    let script = run
                        .args
                        .cluster_script
                        .clone()
                        .context("no cluster script")?;
                    let at = workload_start.elapsed();
                    restart = Some(tokio::task::spawn_blocking(move || {
                        restart_apiserver(&script, at)
                    }));
                }
                Scenario::RollingUpdate => {
                    slot += 1;
                    let mut next =
                        run.spawn_controller(&ns, slot, true, &format!("controller-{slot}"))?;
                    let started_new = Instant::now();
                    let live_ok =
                        wait_endpoint(&mut next, "/healthz", Duration::from_secs(60)).await;
                    // Overlap: both run for a moment, the new one waiting for the lease.
                    tokio::time::sleep(Duration::from_millis(rng.u64(500..3000))).await;
                    let old = std::mem::replace(&mut current, next);
                    let stopped = stop_gracefully(old).await;
                    let took_over =
                        wait_endpoint(&mut current, "/readyz", Duration::from_secs(60)).await;
                    figures.disruptions.push(format!(
                        "{} replaced by {} (new one live: {live_ok}; old {stopped}; leader after {:.1?}: {took_over})",
                        if slot == 1 { "controller-0".to_string() } else { format!("controller-{}", slot - 1) },
                        current.label,
                        started_new.elapsed()
                    ));
                }
                Scenario::Faults => {}
            }
        }
        step(
            &batches,
            &mut rng,
            &mut live,
            &mut figures,
            run.args.max_live,
            batches_to_create,
        )
        .await;
        // Pace: never faster than min_duration allows, with jitter.
        let due = workload_start
            + min_duration.mul_f64(figures.created as f64 / batches_to_create as f64);
        let jitter = Duration::from_millis(rng.u64(5..60));
        tokio::time::sleep_until((due.max(Instant::now()) + jitter).into()).await;
    }
    // The fault scenario keeps its faults on until a full stall has had time to happen.
    if scenario == Scenario::Faults {
        let until = workload_start + min_duration;
        tokio::time::sleep_until(until.into()).await;
    }
    if let Some(restart) = restart {
        figures.disruptions.push(restart.await??);
    }
    run.proxy.set_enabled(false);
    figures.faults = delta(run.proxy.counts(), faults_before);
    let workload_time = workload_start.elapsed();
    println!(
        "  workload done in {:.1?}: {} batches created; waiting for convergence",
        workload_time, figures.created
    );

    // Convergence: every remaining batch gets all it asked for.
    let converge_start = Instant::now();
    let converge_deadline = converge_start + Duration::from_secs(run.args.converge_seconds);
    let mut remaining: Vec<BatchSandbox>;
    loop {
        remaining = list_all(&batches).await;
        let done = remaining
            .iter()
            .filter(|b| invariants::converged(b))
            .count();
        if done == remaining.len() || Instant::now() >= converge_deadline {
            figures.batches_at_end = remaining.len();
            figures.converged = done;
            figures.not_converged = remaining
                .iter()
                .filter(|b| !invariants::converged(b))
                .map(|b| {
                    format!(
                        "{} {:?} ledger {:?}",
                        b.name_any(),
                        b.status
                            .as_ref()
                            .map(|s| (s.replicas, s.allocated, s.ready)),
                        invariants_ledger(b)
                    )
                })
                .collect();
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    figures.converge_time = converge_start.elapsed();
    let pods_now = list_all(&pods).await;
    let pools_now = list_all(&pools).await;
    for v in invariants::check_settled(&pods_now, &remaining, &pools_now) {
        let at = started.elapsed().as_secs_f64();
        figures.violations.entry(v.to_string()).or_insert((v, at));
    }

    // Deletion: every batch goes, its pods are released.
    for b in &remaining {
        let _ = batches
            .delete(&b.name_any(), &DeleteParams::default())
            .await;
    }
    let gone_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = list_all(&batches).await.len();
        if left == 0 || Instant::now() >= gone_deadline {
            figures.deleted = (remaining.len() - left.min(remaining.len()), remaining.len());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // With every batch gone, the pools hold nothing and every pod is owned by its pool.
    let release_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: i32 = list_all(&pools)
            .await
            .iter()
            .filter_map(|p| p.status.as_ref())
            .map(|s| s.allocated)
            .sum();
        figures.held_after_release = held;
        if held == 0 || Instant::now() >= release_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if figures.held_after_release > 0 {
        // Which pods, and does a fresh pool reconcile (forced by touching the pools) let go?
        figures.held_detail = held_detail(&pools, &pods).await;
        let history = monitor
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for pod in list_all(&pods).await {
            if let Some(seen) = history.get(&pod.name_any()) {
                figures.held_detail.push(format!(
                    "pod {} (live) was named by the ledgers of: {}",
                    pod.name_any(),
                    seen.iter()
                        .map(|(b, at)| format!("{b} (from {at:.1}s)"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        for name in POOLS {
            let touch = serde_json::json!({"metadata": {"annotations": {"chaos.sandbox.opensandbox.io/touch": format!("{}", started.elapsed().as_millis())}}});
            let _ = pools
                .patch(name, &PatchParams::default(), &Patch::Merge(&touch))
                .await;
        }
        let recheck_deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let held: i32 = list_all(&pools)
                .await
                .iter()
                .filter_map(|p| p.status.as_ref())
                .map(|s| s.allocated)
                .sum();
            figures.held_after_reconcile = held;
            if held == 0 || Instant::now() >= recheck_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let batches_now = list_all(&batches).await;
    figures.leaks = invariants::leaks(
        &list_all(&pods).await,
        &batches_now,
        &list_all(&pools).await,
    );

    // The pools go last; nothing may outlive them.
    for name in POOLS {
        let _ = pools.delete(name, &DeleteParams::default()).await;
    }
    let drain_deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left_pools = list_all(&pools).await.len();
        let left_pods: Vec<Pod> = list_all(&pods)
            .await
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        if (left_pools == 0 && left_pods.is_empty()) || Instant::now() >= drain_deadline {
            figures.pools_drained = (POOLS.len() - left_pools.min(POOLS.len()), POOLS.len());
            let pools_left = list_all(&pools).await;
            for leak in invariants::leaks(&left_pods, &[], &pools_left) {
                if !figures.leaks.contains(&leak) {
                    figures.leaks.push(leak);
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The watches saw everything up to here.
    for (text, found) in monitor
        .found
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        figures
            .violations
            .entry(text.clone())
            .or_insert_with(|| found.clone());
    }
    drop(monitor);
    drop(current);
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    figures.elapsed = started.elapsed();
    Ok(figures)
}

/// Per pool: its status counts and its live pods with their phase.
async fn held_detail(pools: &Api<Pool>, pods: &Api<Pod>) -> Vec<String> {
    let all_pods = list_all(pods).await;
    list_all(pools)
        .await
        .iter()
        .filter(|p| p.status.as_ref().is_some_and(|s| s.allocated > 0))
        .map(|p| {
            let s = p.status.clone().unwrap_or_default();
            let live: Vec<String> = all_pods
                .iter()
                .filter(|pod| {
                    pod.metadata.deletion_timestamp.is_none()
                        && pod
                            .labels()
                            .get(sandbox_domain::api::names::LABEL_POOL_NAME)
                            == Some(&p.name_any())
                })
                .map(|pod| {
                    let phase = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.phase.clone())
                        .unwrap_or_default();
                    format!(
                        "{} ({phase}, created {})",
                        pod.name_any(),
                        pod.metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| t.0.to_string())
                            .unwrap_or_default()
                    )
                })
                .collect();
            format!(
                "pool {}: total {}, allocated {}, available {}, pending {}; live pods: {}",
                p.name_any(),
                s.total,
                s.allocated,
                s.available,
                s.pending,
                live.join(", ")
            )
        })
        .collect()
}

fn invariants_ledger(b: &BatchSandbox) -> Vec<String> {
    sandbox_domain::allocation::AllocStatus::of(b)
        .map(|l| l.pods)
        .unwrap_or_default()
}

fn delta(now: FaultCounts, before: FaultCounts) -> FaultCounts {
    FaultCounts {
        connections: now.connections - before.connections,
        requests: now.requests - before.requests,
        dropped_responses: now.dropped_responses - before.dropped_responses,
        resets: now.resets - before.resets,
        delayed_connections: now.delayed_connections - before.delayed_connections,
        stalls: now.stalls - before.stalls,
    }
}

/// SIGTERM, as a rolling update does; SIGKILL after 20 s.
async fn stop_gracefully(mut controller: Controller) -> String {
    let pid = rustix::process::Pid::from_raw(controller.child.id() as i32);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = controller.child.try_wait() {
            return format!("stopped by SIGTERM ({status})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    "killed after ignoring SIGTERM for 20s".to_string()
}

/// Stops kube-apiserver alone, then starts it again through `cluster.sh up` (which leaves every
/// running component as it is).
fn restart_apiserver(script: &Path, at: Duration) -> anyhow::Result<String> {
    let begun = Instant::now();
    let status = Command::new(script)
        .args(["stop", "kube-apiserver"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("cluster.sh stop kube-apiserver failed: {status}");
    }
    let down_for = begun.elapsed();
    let status = Command::new(script)
        .arg("up")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("cluster.sh up (restarting kube-apiserver) failed: {status}");
    }
    Ok(format!(
        "kube-apiserver stopped at {:.1}s (stop took {:.1?}), serving again {:.1?} later",
        at.as_secs_f64(),
        down_for,
        begun.elapsed()
    ))
}

/// One workload step: create a batch while fewer than `max_live` exist, else (and sometimes
/// anyway) scale one down or delete one.
async fn step(
    batches: &Api<BatchSandbox>,
    rng: &mut fastrand::Rng,
    live: &mut Vec<(String, i32)>,
    figures: &mut Figures,
    max_live: usize,
    to_create: usize,
) {
    let churn = live.len() >= max_live || (!live.is_empty() && rng.f64() < 0.35);
    if !churn && figures.created < to_create {
        let name = format!("b{}", figures.created);
        let pooled = rng.f64() < 0.9;
        let replicas = if pooled { rng.i32(1..=3) } else { 1 };
        let object = if pooled {
            pooled_batch(&name, POOLS[rng.usize(0..POOLS.len())], replicas)
        } else {
            non_pooled_batch(&name, replicas)
        };
        match batches.create(&PostParams::default(), &object).await {
            Ok(_) => {
                figures.created += 1;
                figures.pods_requested += replicas as usize;
                live.push((name, replicas));
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Created by an earlier attempt whose response was lost: take it as it is.
                if let Ok(existing) = batches.get(&name).await {
                    figures.created += 1;
                    figures.pods_requested += existing.spec.replicas.max(0) as usize;
                    live.push((name, existing.spec.replicas));
                }
            }
            Err(_) => {
                figures.driver_errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        return;
    }
    if live.is_empty() {
        return;
    }
    let i = rng.usize(0..live.len());
    let (name, replicas) = live[i].clone();
    if replicas > 1 && rng.bool() {
        let patch = serde_json::json!({"spec": {"replicas": replicas - 1}});
        match batches
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                figures.scale_downs += 1;
                live[i].1 -= 1;
            }
            Err(_) => figures.driver_errors += 1,
        }
    } else {
        match batches.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                figures.deletions += 1;
                live.swap_remove(i);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                live.swap_remove(i);
            }
            Err(_) => figures.driver_errors += 1,
        }
    }
}

/// Lists everything, retrying for a while (the apiserver may be restarting).
async fn list_all<K>(api: &Api<K>) -> Vec<K>
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    for _ in 0..120 {
        if let Ok(list) = api.list(&ListParams::default()).await {
            return list.items;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Vec::new()
}

fn pool(name: &str) -> Pool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool", "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "sandbox", "image": "opensandbox/code-interpreter:v1.0.1"}]}},
                 "capacitySpec": {"bufferMin": 4, "bufferMax": 12, "poolMin": 4, "poolMax": 40}}
    }))
    .expect("valid Pool")
}

fn pooled_batch(name: &str, pool: &str, replicas: i32) -> BatchSandbox {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": name},
        "spec": {"replicas": replicas, "poolRef": pool}
    }))
    .expect("valid BatchSandbox")
}

fn non_pooled_batch(name: &str, replicas: i32) -> BatchSandbox {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": name},
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "sandbox", "image": "nginx:latest"}]}}}
    }))
    .expect("valid BatchSandbox")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loopback_apiserver_is_accepted() {
        assert_eq!(
            loopback_addr("https://127.0.0.1:16940/").unwrap(),
            "127.0.0.1:16940".parse::<SocketAddr>().unwrap()
        );
        assert!(loopback_addr("https://10.96.0.1:443/").is_err());
        assert!(loopback_addr("http://127.0.0.1:8080/").is_err());
        assert!(loopback_addr("https://localhost:6443/").is_err());
    }

    #[test]
    fn disruption_moments_follow_the_seed() {
        let draw = |seed| disruption_points(&mut fastrand::Rng::with_seed(seed), 20, 250);
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let points = draw(7);
        assert_eq!(points.len(), 20);
        assert!(points.is_sorted() && points.iter().all(|p| (1..250).contains(p)));
    }

    #[test]
    fn the_proxied_kubeconfig_points_every_cluster_at_the_proxy() {
        let kubeconfig = Kubeconfig::from_yaml(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:16940\n    certificate-authority-data: QUJD\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\nusers:\n- name: u\n  user: {token: t}\n",
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        write_proxied_kubeconfig(kubeconfig, "127.0.0.1:16946".parse().unwrap(), &path).unwrap();
        let back = Kubeconfig::read_from(&path).unwrap();
        let cluster = back.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:16946"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("QUJD"));
        assert_eq!(back.auth_infos.len(), 1);
    }
}
