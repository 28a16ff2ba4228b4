//! Claim benchmarks against a live cluster (the local control plane): starts a namespace-scoped
//! `sandbox-controller`, then measures warm-pool batch allocation, concurrent claim latency, API
//! writes per pooled BatchSandbox, and non-pooled batch start-up. Prints medians over `--runs`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{StreamExt, future};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sandbox_controller::api::{BatchSandbox, Pool, names};
use sandbox_controller::domain::allocation::AllocStatus;

#[derive(Parser)]
#[command(about = "Benchmark claims against the cluster in $KUBECONFIG")]
struct Args {
    /// Runs per measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The controller binary (default: `sandbox-controller` beside this one).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Port for the controller's metrics endpoint.
    #[arg(long, default_value_t = 18191)]
    metrics_port: u16,
}

struct Controller(Child);
impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default()
        .await
        .context("connecting to the cluster in $KUBECONFIG")?;
    let ns = format!("bench-{}", std::process::id());
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let result = bench(&args, client.clone(), &ns).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    result
}

async fn bench(args: &Args, client: Client, ns: &str) -> anyhow::Result<()> {
    let bin = match &args.controller {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("sandbox-controller"),
    };
    let metrics = format!("127.0.0.1:{}", args.metrics_port);
    let _controller = Controller(
        Command::new(&bin)
            .args(["run", "--namespace", ns, "--health-addr", &metrics])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    wait_until("controller ready", Duration::from_secs(30), || async {
        http_get(&metrics, "/readyz")
            .await
            .is_ok_and(|b| b == "ready")
    })
    .await?;
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "sandbox-bench: namespace {ns}, {} run(s) per figure, {profile} build",
        args.runs
    );

    let pools: Api<Pool> = Api::namespaced(client.clone(), ns);
    let batches: Api<BatchSandbox> = Api::namespaced(client.clone(), ns);
    pools
        .create(&PostParams::default(), &pool("warm", 110, 250, 120, 400))
        .await?;
    let seen = Arc::new(Mutex::new(HashMap::<String, Instant>::new()));
    let complete = Arc::new(Mutex::new(HashMap::<String, Instant>::new()));
    spawn_batch_watch(batches.clone(), seen.clone(), complete.clone());

    let mut batch100 = Vec::new();
    let mut latencies = Vec::new();
    let mut writes_per_batch = Vec::new();
    let mut nonpooled = Vec::new();
    for run in 0..args.runs {
        wait_available(&pools, "warm", 105).await?;
        // 1. One batch of 100 from a warm pool: create -> allocated=100 with 100 endpoints.
        let name = format!("b100-{run}");
        let start = Instant::now();
        batches
            .create(&PostParams::default(), &pooled(&name, "warm", 100))
            .await?;
        wait_until(
            "batch of 100 allocated",
            Duration::from_secs(60),
            || async { complete.lock().unwrap().contains_key(&name) },
        )
        .await?;
        batch100.push(complete.lock().unwrap()[&name] - start);
        batches.delete(&name, &DeleteParams::default()).await?;
        wait_gone(&batches, &name).await?;

        // 2. 100 concurrent replicas=1 claims: per-claim create -> allocation seen.
        wait_available(&pools, "warm", 105).await?;
        let before = writes(&metrics).await?;
        let starts: Vec<(String, Instant)> = future::join_all((0..100).map(|i| {
            let batches = batches.clone();
            let name = format!("c{run}-{i}");
            async move {
                let start = Instant::now();
                batches
                    .create(&PostParams::default(), &pooled(&name, "warm", 1))
                    .await
                    .map(|_| (name, start))
            }
        }))
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
        wait_until("100 claims allocated", Duration::from_secs(60), || async {
            let done = complete.lock().unwrap();
            starts.iter().all(|(n, _)| done.contains_key(n))
        })
        .await?;
        {
            let done = complete.lock().unwrap();
            let first_seen = seen.lock().unwrap();
            latencies.extend(starts.iter().map(|(n, s)| done[n] - *s));
            let mut to_watch: Vec<Duration> =
                starts.iter().map(|(n, s)| first_seen[n] - *s).collect();
            let mut to_alloc: Vec<Duration> = starts
                .iter()
                .map(|(n, _)| done[n] - first_seen[n])
                .collect();
            println!(
                "  run {run}: create -> visible in a watch: median {:?}; visible -> allocated: median {:?}, max {:?}",
                median(&mut to_watch),
                median(&mut to_alloc),
                to_alloc.last().copied().unwrap_or_default()
            );
        }
        // Let status writes settle before counting.
        wait_until("statuses written", Duration::from_secs(30), || async {
            let list = batches
                .list(&Default::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            list.iter()
                .filter(|b| b.name_any().starts_with(&format!("c{run}-")))
                .all(|b| b.status.as_ref().is_some_and(|s| s.ready == 1))
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = writes(&metrics).await?;
        writes_per_batch.push((batch_writes(&after) - batch_writes(&before)) as f64 / 100.0);
        writes_per_batch_detail(&before, &after);
        for (name, _) in &starts {
            batches.delete(name, &DeleteParams::default()).await?;
        }

        // 3. A non-pooled batch of 100: create -> all Ready.
        let name = format!("np-{run}");
        let start = Instant::now();
        batches
            .create(&PostParams::default(), &non_pooled(&name, 100))
            .await?;
        wait_until(
            "non-pooled batch ready",
            Duration::from_secs(120),
            || async {
                batches
                    .get(&name)
                    .await
                    .ok()
                    .and_then(|b| b.status)
                    .is_some_and(|s| s.ready == 100)
            },
        )
        .await?;
        nonpooled.push(start.elapsed());
        batches.delete(&name, &DeleteParams::default()).await?;
    }

    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    println!(
        "pooled batch of 100 from a warm pool -> allocated with endpoints: median {:?} (runs: {:?})",
        median(&mut batch100),
        batch100
    );
    println!(
        "claim latency, 100 concurrent replicas=1 batches ({} claims): p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or_default()
    );
    writes_per_batch.sort_by(f64::total_cmp);
    println!(
        "API writes per pooled BatchSandbox (to the BatchSandbox, its status, and events): median {:.2} (runs: {:?})",
        writes_per_batch[writes_per_batch.len() / 2],
        writes_per_batch
    );
    println!(
        "non-pooled batch of 100 -> all Ready: median {:?} (runs: {:?})",
        median(&mut nonpooled),
        nonpooled
    );
    Ok(())
}

fn writes_per_batch_detail(before: &Writes, after: &Writes) {
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    println!(
        "  writes during 100 claims: batchsandbox {}, batchsandbox_status {}, event {}; pool-side (amortised over all claims): pool {}, pool_status {}, pod {}",
        d("batchsandbox"),
        d("batchsandbox_status"),
        d("event"),
        d("pool"),
        d("pool_status"),
        d("pod")
    );
}

type Writes = HashMap<String, u64>;

/// Per-batch writes: to BatchSandbox objects, their status, and events.
fn batch_writes(w: &Writes) -> u64 {
    ["batchsandbox", "batchsandbox_status", "event"]
        .iter()
        .map(|k| w.get(*k).copied().unwrap_or(0))
        .sum()
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Records when each batch first has a full ledger and endpoints for all its shards.
fn spawn_batch_watch(
    api: Api<BatchSandbox>,
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    complete: Arc<Mutex<HashMap<String, Instant>>>,
) {
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(batch)) = stream.next().await {
            let now = Instant::now();
            let name = batch.name_any();
            seen.lock().unwrap().entry(name.clone()).or_insert(now);
            let annotations = batch.annotations();
            let held = AllocStatus::of(&batch).map(|a| a.pods.len()).unwrap_or(0);
            let endpoints: usize = annotations
                .get(names::ANNOTATION_ENDPOINTS)
                .and_then(|e| serde_json::from_str::<Vec<serde_json::Value>>(e).ok())
                .map_or(0, |l| l.len());
            let want = batch.spec.replicas as usize;
            if want > 0 && held == want && endpoints == want {
                complete.lock().unwrap().entry(name).or_insert(now);
            }
        }
    });
}

async fn wait_available(pools: &Api<Pool>, name: &str, n: i32) -> anyhow::Result<()> {
    wait_until("pool warm", Duration::from_secs(120), || async {
        pools
            .get(name)
            .await
            .ok()
            .and_then(|p| p.status)
            .is_some_and(|s| s.available >= n)
    })
    .await
}

async fn wait_gone(api: &Api<BatchSandbox>, name: &str) -> anyhow::Result<()> {
    wait_until("batch deleted", Duration::from_secs(60), || async {
        api.get_opt(name).await.ok().flatten().is_none()
    })
    .await
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("timed out waiting for {what}")
}

/// Write counts by target from the controller's metrics.
async fn writes(addr: &str) -> anyhow::Result<Writes> {
    let body = http_get(addr, "/metrics").await?;
    Ok(body
        .lines()
        .filter_map(|l| l.strip_prefix("sandbox_controller_api_writes_total{target=\""))
        .filter_map(|l| {
            let (target, rest) = l.split_once("\"} ")?;
            Some((target.to_string(), rest.trim().parse().ok()?))
        })
        .collect())
}

async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header("host", addr)
        .body(Empty::<hyper::body::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    Ok(String::from_utf8_lossy(&response.into_body().collect().await?.to_bytes()).into_owned())
}

fn pool(name: &str, buffer_min: i32, buffer_max: i32, pool_min: i32, pool_max: i32) -> Pool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool", "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "sandbox", "image": "opensandbox/code-interpreter:v1.0.1"}]}},
                 "capacitySpec": {"bufferMin": buffer_min, "bufferMax": buffer_max, "poolMin": pool_min, "poolMax": pool_max}}
    }))
    .expect("valid Pool")
}

fn pooled(name: &str, pool: &str, replicas: i32) -> BatchSandbox {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": name},
        "spec": {"replicas": replicas, "poolRef": pool}
    }))
    .expect("valid BatchSandbox")
}

fn non_pooled(name: &str, replicas: i32) -> BatchSandbox {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": name},
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "sandbox", "image": "nginx:latest"}]}}}
    }))
    .expect("valid BatchSandbox")
}
