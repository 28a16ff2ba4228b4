//! The scenes and their phases, against a live cluster and one controller process the bench
//! starts itself.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt, future};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sandbox_domain::api::{BatchSandbox, Pool};
use tokio::sync::watch;

use super::metrics::{self, Counts};
use super::procfs::{self, Memory};
use super::report::{
    Aggregate, ClaimPhase, ClaimSample, LoadSample, NormalReport, PhaseCost, PhaseCounts, Report,
    RunFigures, ScaleReport,
};
use super::scene::{self, Batches, Pools, wait_for};

/// Settings of a bench invocation (from the command line).
#[derive(Clone, Debug)]
pub struct Settings {
    pub runs: usize,
    pub sequential_claims: usize,
    pub controller: PathBuf,
    pub metrics_port: u16,
    pub probe_timeout: Duration,
    pub scale: Option<ScaleSettings>,
    pub json: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ScaleSettings {
    pub pools: usize,
    pub pods_per_pool: usize,
    pub live_batches: usize,
    pub churn_per_second: f64,
}

/// Pods the normal scene's warm pool keeps available before each phase.
const WARM: i32 = 105;

/// The controller the bench runs, in a process group of its own; the group is killed when this
/// is dropped, so a controller started through a wrapper (a profiler, a shell script) goes with
/// it and never reconciles the next run's namespace.
struct Controller {
    child: Child,
    metrics: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let group = rustix::process::Pid::from_child(&self.child);
        if rustix::process::kill_process_group(group, rustix::process::Signal::KILL).is_err() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Controller {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Counters at a moment, to take phase deltas from.
struct Snapshot {
    at: Instant,
    cpu: procfs::CpuReading,
    controller: Counts,
    reconciles: Counts,
    policy_decisions: Counts,
    pool_wakes: Counts,
    apiserver: Counts,
    churn_claims: usize,
}

#[derive(Default)]
struct Churn {
    claims: AtomicUsize,
    releases: AtomicUsize,
}

struct Bench {
    client: Client,
    settings: Settings,
    batches: Api<BatchSandbox>,
    pools: Api<Pool>,
    batch_state: watch::Receiver<Batches>,
    pool_state: watch::Receiver<Pools>,
    pod_state: watch::Receiver<scene::Pods>,
    controller: Controller,
    started: Instant,
    report: Report,
    churn: Arc<Churn>,
}

/// Runs the bench in a fresh namespace and removes it afterwards.
pub async fn run(client: Client, settings: Settings) -> anyhow::Result<Report> {
    let ns = format!("bench-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?,
        )
        .await
        .with_context(|| format!("creating namespace {ns}"))?;
    let result = in_namespace(client.clone(), settings, &ns).await;
    let cleanup = delete_namespace(&client, &ns).await;
    let report = result?;
    cleanup?;
    Ok(report)
}

async fn in_namespace(client: Client, settings: Settings, ns: &str) -> anyhow::Result<Report> {
    let pools: Api<Pool> = Api::namespaced(client.clone(), ns);
    refuse_foreign_controller(&pools, ns, settings.probe_timeout).await?;
    let controller = start_controller(&settings, ns).await?;
    let batches: Api<BatchSandbox> = Api::namespaced(client.clone(), ns);
    let (batch_state, batch_task) = scene::watch_batches(batches.clone());
    let (pool_state, pool_task) = scene::watch_pools(pools.clone());
    let (pod_state, pod_task) = scene::watch_pods(Api::namespaced(client.clone(), ns));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "sandbox-bench: namespace {ns}, {} run(s), {profile} build, controller pid {}",
        settings.runs,
        controller.child.id()
    );
    let mut bench = Bench {
        client,
        batches,
        pools,
        batch_state,
        pool_state,
        pod_state,
        controller,
        started: Instant::now(),
        report: Report {
            profile: profile.to_owned(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ..Default::default()
        },
        churn: Arc::default(),
        settings,
    };
    let result = bench.all().await;
    // Empty the namespace while the controller still runs, so it removes its finalizers.
    let emptied = bench.empty_namespace().await;
    batch_task.abort();
    pool_task.abort();
    pod_task.abort();
    result?;
    emptied?;
    Ok(bench.report)
}

impl Bench {
    async fn all(&mut self) -> anyhow::Result<()> {
        self.load("start");
        if self.settings.runs > 0 {
            let normal = self.normal().await?;
            print_normal(&normal);
            self.report.normal = Some(normal);
            self.save()?;
        }
        if let Some(scale) = self.settings.scale.clone() {
            let figures = self.scale(&scale).await?;
            print_scale(&figures);
            self.report.scale = Some(figures);
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.settings.json {
            self.report.write(path)?;
            println!("figures written to {}", path.display());
        }
        Ok(())
    }

    fn load(&mut self, phase: &str) {
        let at_s = self.started.elapsed().as_secs_f64();
        if let Some(sample) = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| LoadSample::parse(at_s, phase, &l))
        {
            self.report.load.push(sample);
        }
    }

    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let at = Instant::now();
        let controller_text = http_get(&self.controller.metrics, "/metrics")
            .await
            .context("reading the controller's /metrics")?;
        let controller = metrics::controller_writes(&controller_text)?;
        let reconciles = metrics::controller_reconciles(&controller_text)?;
        let policy_decisions = metrics::policy_decisions(&controller_text)?;
        let pool_wakes = metrics::pool_wakes(&controller_text)?;
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let apiserver = metrics::apiserver_writes(
            &self
                .client
                .request_text(request)
                .await
                .context("reading the apiserver's /metrics")?,
        )?;
        Ok(Snapshot {
            at,
            cpu: procfs::cpu_reading(self.controller.pid())?,
            controller,
            reconciles,
            policy_decisions,
            pool_wakes,
            apiserver,
            churn_claims: self.churn.claims.load(Ordering::Relaxed),
        })
    }

    /// The cost between two snapshots, divided over the phase's claims and any background
    /// claims made meanwhile.
    fn cost(&self, before: &Snapshot, after: &Snapshot, claims: usize) -> PhaseCost {
        let claims = claims + after.churn_claims.saturating_sub(before.churn_claims);
        PhaseCost::new(
            claims,
            (after.at - before.at).as_secs_f64() * 1000.0,
            after.cpu.ms_since(&before.cpu),
            PhaseCounts {
                controller_writes: metrics::delta(&before.controller, &after.controller),
                apiserver_writes: metrics::delta(&before.apiserver, &after.apiserver),
                controller_reconciles: metrics::delta(&before.reconciles, &after.reconciles),
                policy_decisions: metrics::delta(&before.policy_decisions, &after.policy_decisions),
                pool_wakes: metrics::delta(&before.pool_wakes, &after.pool_wakes),
            },
        )
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        Ok(procfs::memory(self.controller.pid())?)
    }

    async fn wait_pool(
        &self,
        pool: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&scene::PoolCounts) -> bool,
    ) -> anyhow::Result<()> {
        let mut rx = self.pool_state.clone();
        wait_for(&mut rx, what, timeout, |s| {
            s.counts.get(pool).is_some_and(&ok)
        })
        .await
    }

    async fn wait_batches(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl FnMut(&Batches) -> bool,
    ) -> anyhow::Result<()> {
        let mut rx = self.batch_state.clone();
        wait_for(&mut rx, what, timeout, ok).await
    }

    /// Creates a pooled batch; returns when its create call started.
    async fn create_claim(&self, name: &str, pool: &str, replicas: i32) -> anyhow::Result<Instant> {
        let start = Instant::now();
        self.batches
            .create(&PostParams::default(), &scene::pooled(name, pool, replicas))
            .await
            .with_context(|| format!("creating BatchSandbox {name}"))?;
        Ok(start)
    }

    fn samples(&self, starts: &[(String, Instant)]) -> Vec<ClaimSample> {
        let state = self.batch_state.borrow();
        starts
            .iter()
            .map(|(name, start)| {
                let seen = state.first_seen[name];
                ClaimSample {
                    api_ms: (seen - *start).as_secs_f64() * 1000.0,
                    controller_ms: (state.complete[name] - seen).as_secs_f64() * 1000.0,
                    status_ready_ms: state
                        .status_ready
                        .get(name)
                        .map(|at| (*at - *start).as_secs_f64() * 1000.0),
                }
            })
            .collect()
    }

    async fn wait_complete(&self, names: &[String], timeout: Duration) -> anyhow::Result<()> {
        self.wait_batches(
            &format!("{} claim(s) allocated", names.len()),
            timeout,
            |s| names.iter().all(|n| s.complete.contains_key(n)),
        )
        .await
    }

    /// Waits until the controller has written every claim's status (Ready).
    async fn wait_ready(
        &self,
        names: &[String],
        replicas: i32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait_batches(
            &format!("{} batch status(es) Ready", names.len()),
            timeout,
            |s| names.iter().all(|n| s.ready.get(n) == Some(&replicas)),
        )
        .await
    }

    async fn delete_batches(&self, names: &[String]) -> anyhow::Result<()> {
        future::try_join_all(names.iter().map(|name| async move {
            self.batches
                .delete(name, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting BatchSandbox {name}"))
        }))
        .await?;
        self.wait_batches(
            &format!("{} batch(es) deleted", names.len()),
            Duration::from_secs(120),
            |s| names.iter().all(|n| !s.present.contains(n)),
        )
        .await
    }

    /// One pooled batch of `replicas` -> allocated with endpoints for all of them. With
    /// `settle`, the batch is deleted only once the pool's status counts at least that many pods
    /// allocated: the next phase's wait for a warm pool reads the status, and one written before
    /// this batch was served would show the pool warm while its pods are being recycled.
    async fn one_batch(
        &self,
        name: &str,
        pool: &str,
        replicas: i32,
        settle: Option<(&str, i32)>,
    ) -> anyhow::Result<ClaimSample> {
        let start = self.create_claim(name, pool, replicas).await?;
        let names = [name.to_owned()];
        self.wait_complete(&names, Duration::from_secs(120)).await?;
        let sample = self.samples(&[(name.to_owned(), start)])[0];
        if let Some((pool, held)) = settle {
            self.wait_pool(
                pool,
                "pool status counting the batch",
                Duration::from_secs(120),
                |c| c.allocated >= held,
            )
            .await?;
        }
        self.delete_batches(&names).await?;
        Ok(sample)
    }

    /// `n` concurrent `replicas: 1` claims over `pools` (round robin). The cost window closes
    /// once every claim's status is written and `settled` holds.
    async fn burst(
        &mut self,
        prefix: &str,
        pools: &[String],
        n: usize,
        settle: Option<(&str, i32)>,
    ) -> anyhow::Result<ClaimPhase> {
        let before = self.snapshot().await?;
        let this = &*self;
        let starts: Vec<(String, Instant)> = future::try_join_all((0..n).map(|i| {
            let name = format!("{prefix}-{i}");
            let pool = &pools[i % pools.len()];
            async move { this.create_claim(&name, pool, 1).await.map(|s| (name, s)) }
        }))
        .await?;
        self.finish_phase(prefix, before, starts, settle).await
    }

    /// `n` `replicas: 1` claims one after another, each waited for before the next.
    async fn sequential(
        &mut self,
        prefix: &str,
        pools: &[String],
        n: usize,
        settle: Option<(&str, i32)>,
    ) -> anyhow::Result<ClaimPhase> {
        let before = self.snapshot().await?;
        let mut starts = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("{prefix}-{i}");
            let start = self.create_claim(&name, &pools[i % pools.len()], 1).await?;
            self.wait_complete(std::slice::from_ref(&name), Duration::from_secs(60))
                .await?;
            starts.push((name, start));
        }
        self.finish_phase(prefix, before, starts, settle).await
    }

    async fn finish_phase(
        &mut self,
        phase: &str,
        before: Snapshot,
        starts: Vec<(String, Instant)>,
        settle: Option<(&str, i32)>,
    ) -> anyhow::Result<ClaimPhase> {
        let names: Vec<String> = starts.iter().map(|(n, _)| n.clone()).collect();
        self.wait_complete(&names, Duration::from_secs(120)).await?;
        self.wait_ready(&names, 1, Duration::from_secs(120)).await?;
        let samples = self.samples(&starts);
        if let Some((pool, held)) = settle {
            // The pool's status counts the claims, and the pool has refilled its buffer.
            self.wait_pool(pool, "pool status settled", Duration::from_secs(120), |c| {
                c.allocated == held && c.available >= WARM
            })
            .await?;
        }
        let after = self.snapshot().await?;
        self.load(phase);
        let cost = self.cost(&before, &after, names.len());
        self.delete_batches(&names).await?;
        Ok(ClaimPhase::new(samples, cost))
    }

    async fn normal(&mut self) -> anyhow::Result<NormalReport> {
        let cpu_at_start = procfs::cpu_reading(self.controller.pid())?;
        self.pools
            .create(
                &PostParams::default(),
                &scene::pool("warm", 110, 250, 120, 400),
            )
            .await?;
        let warm = ["warm".to_owned()];
        let mut runs = Vec::new();
        for run in 0..self.settings.runs {
            let mut figures = RunFigures::default();
            self.wait_warm().await?;
            figures.batch100 = Some(
                self.one_batch(&format!("b100-{run}"), "warm", 100, Some(("warm", 100)))
                    .await?,
            );
            self.wait_warm().await?;
            figures.burst = self
                .burst(&format!("c{run}"), &warm, 100, Some(("warm", 100)))
                .await?;
            self.wait_warm().await?;
            let n = self.settings.sequential_claims;
            figures.sequential = self
                .sequential(&format!("s{run}"), &warm, n, Some(("warm", n as i32)))
                .await?;
            figures.nonpooled_ms = Some(self.nonpooled(&format!("np-{run}")).await?);
            print_run(run, &figures);
            runs.push(figures);
        }
        let memory = self.memory()?;
        let cpu_at_end = procfs::cpu_reading(self.controller.pid())?;
        let process_cpu_ms = procfs::cpu_ms(self.controller.pid())?;
        self.pools.delete("warm", &DeleteParams::default()).await?;
        Ok(NormalReport {
            aggregate: Aggregate::of(&runs),
            runs,
            memory,
            cpu_ms: cpu_at_end.ms_since(&cpu_at_start),
            process_cpu_ms,
        })
    }

    /// Waits until the warm pool is refilled and the pods of earlier phases are gone, so that
    /// a phase's window counts its own writes only.
    async fn wait_warm(&self) -> anyhow::Result<()> {
        self.wait_pool("warm", "warm pool", Duration::from_secs(180), |c| {
            c.allocated == 0 && c.available >= WARM
        })
        .await?;
        let mut rx = self.pod_state.clone();
        wait_for(
            &mut rx,
            "released pods gone",
            Duration::from_secs(180),
            |p| p.terminating.is_empty(),
        )
        .await
    }

    async fn nonpooled(&mut self, name: &str) -> anyhow::Result<f64> {
        let start = Instant::now();
        self.batches
            .create(&PostParams::default(), &scene::non_pooled(name, 100))
            .await?;
        let names = [name.to_owned()];
        self.wait_ready(&names, 100, Duration::from_secs(300))
            .await?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        self.load("nonpooled");
        self.delete_batches(&names).await?;
        Ok(ms)
    }

    async fn scale(&mut self, s: &ScaleSettings) -> anyhow::Result<ScaleReport> {
        let scene_start = Instant::now();
        let pod_count = s.pools * s.pods_per_pool;
        println!(
            "scale: {} pools x {} pods = {pod_count} pods, {} live batches",
            s.pools, s.pods_per_pool, s.live_batches
        );
        let added = self.add_nodes(pod_count + pod_count / 10).await?;
        let result = self.scale_scene(s, scene_start, added.len()).await;
        // The pods go before the nodes they run on.
        let emptied = self.empty_namespace().await;
        let removed = self.remove_nodes(&added).await;
        let report = result?;
        emptied?;
        removed?;
        Ok(ScaleReport {
            total_ms: scene_start.elapsed().as_secs_f64() * 1000.0,
            ..report
        })
    }

    async fn scale_scene(
        &mut self,
        s: &ScaleSettings,
        scene_start: Instant,
        nodes_added: usize,
    ) -> anyhow::Result<ScaleReport> {
        let pool_names: Vec<String> = (0..s.pools).map(|i| format!("pool-{i}")).collect();
        let size = i32::try_from(s.pods_per_pool).context("--pods-per-pool")?;
        let fill_start = self.snapshot().await?;
        for name in &pool_names {
            self.pools
                .create(
                    &PostParams::default(),
                    &scene::pool(name, 0, size, size, size),
                )
                .await?;
        }
        let fill_timeout = Duration::from_secs(300)
            + Duration::from_millis(100) * (s.pools * s.pods_per_pool) as u32;
        {
            let mut rx = self.pool_state.clone();
            wait_for(
                &mut rx,
                "every pool full and available",
                fill_timeout,
                |st| {
                    pool_names.iter().all(|p| {
                        st.counts
                            .get(p)
                            .is_some_and(|c| c.total == size && c.available == size)
                    })
                },
            )
            .await?;
        }
        let filled = self.snapshot().await?;
        self.load("scale fill");
        println!(
            "scale: pools filled in {:.1} s",
            (filled.at - fill_start.at).as_secs_f64()
        );

        let live_start = Instant::now();
        let live: Vec<String> = (0..s.live_batches).map(|i| format!("live-{i}")).collect();
        futures::stream::iter(live.iter().enumerate())
            .map(|(i, name)| self.create_claim(name, &pool_names[i % s.pools], 1))
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await?;
        let live_timeout =
            Duration::from_secs(120) + Duration::from_millis(100) * s.live_batches as u32;
        self.wait_complete(&live, live_timeout).await?;
        let live_ms = live_start.elapsed().as_secs_f64() * 1000.0;
        // The phases measure a settled scene: the live batches' status writes, which trail their
        // allocations, would otherwise land in the first phases' windows and queues.
        self.wait_ready(&live, 1, live_timeout).await?;
        self.load("scale live");
        println!(
            "scale: {} live batches allocated in {:.1} s",
            s.live_batches,
            live_ms / 1000.0
        );

        let flow_start = self.snapshot().await?;
        let (stop, stopped) = watch::channel(false);
        let churn = self.start_churn(live, &pool_names, s.churn_per_second, stopped);
        let measured = self.scale_phases(s, &pool_names).await;
        // Stopped between operations, so no create is cut off half-sent.
        let _ = stop.send(true);
        let live_per_pool = churn.await.context("the churn task failed")?;
        let run = measured?;
        // The flow's window closes once every pool's status shows its live batches again, so
        // status writes held back while claims flowed are counted too.
        {
            let mut rx = self.pool_state.clone();
            wait_for(
                &mut rx,
                "every pool's status showing its live batches",
                Duration::from_secs(120),
                |st| {
                    pool_names.iter().all(|p| {
                        st.counts.get(p).is_some_and(|c| {
                            c.allocated == live_per_pool.get(p).copied().unwrap_or_default()
                        })
                    })
                },
            )
            .await?;
        }
        let flow_end = self.snapshot().await?;
        let sandboxes_claimed = run.burst.samples.len()
            + run.sequential.samples.len()
            + if run.batch100.is_some() { 100 } else { 0 };
        let flowing = self.cost(&flow_start, &flow_end, sandboxes_claimed);
        let memory = self.memory()?;
        Ok(ScaleReport {
            pools: s.pools,
            pods_per_pool: s.pods_per_pool,
            live_batches: s.live_batches,
            nodes_added,
            fill_ms: (filled.at - fill_start.at).as_secs_f64() * 1000.0,
            fill_cpu_ms: filled.cpu.ms_since(&fill_start.cpu),
            live_ms,
            churn_claims: self.churn.claims.load(Ordering::Relaxed),
            churn_releases: self.churn.releases.load(Ordering::Relaxed),
            flowing,
            aggregate: Aggregate::of(std::slice::from_ref(&run)),
            run,
            memory,
            total_ms: scene_start.elapsed().as_secs_f64() * 1000.0,
        })
    }

    async fn scale_phases(
        &mut self,
        s: &ScaleSettings,
        pools: &[String],
    ) -> anyhow::Result<RunFigures> {
        let mut figures = RunFigures::default();
        let live_per_pool = s.live_batches.div_ceil(s.pools);
        if s.pods_per_pool >= 100 + live_per_pool + 10 {
            self.wait_pool(
                &pools[0],
                "pool-0 has 100 available",
                Duration::from_secs(300),
                |c| c.available >= 100,
            )
            .await?;
            figures.batch100 = Some(
                self.one_batch("scale-b100", &pools[0], 100, Some((&pools[0], 100)))
                    .await?,
            );
            // Its 100 pods are recycled: the burst starts once they are back, not among their
            // deletions and re-creations.
            let size = i32::try_from(s.pods_per_pool).context("--pods-per-pool")?;
            let refilled = size - i32::try_from(live_per_pool).context("--live-batches")? - 5;
            self.wait_pool(
                &pools[0],
                "pool-0 refilled after the batch of 100",
                Duration::from_secs(300),
                |c| c.total == size && c.available >= refilled,
            )
            .await?;
        } else {
            println!("scale: pools too small for a batch of 100; skipped");
        }
        figures.burst = self.burst("scale-c", pools, 100, None).await?;
        let n = self.settings.sequential_claims;
        figures.sequential = self.sequential("scale-s", pools, n, None).await?;
        Ok(figures)
    }

    /// Releases the oldest live batch and claims a new one on the same pool, `per_second`
    /// times a second, until `stop` turns true. Returns the live batches of each pool then.
    fn start_churn(
        &self,
        live: Vec<String>,
        pools: &[String],
        per_second: f64,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<HashMap<String, i32>> {
        let batches = self.batches.clone();
        let churn = self.churn.clone();
        let pools = pools.to_vec();
        let period = Duration::from_secs_f64(1.0 / per_second.max(0.01));
        // Slot i holds a batch of pool i % pools, or none once a claim failed.
        let mut live: Vec<Option<String>> = live.into_iter().map(Some).collect();
        let names = pools.clone();
        let live_per_pool = move |live: &[Option<String>]| {
            let mut counts: HashMap<String, i32> = HashMap::new();
            for (slot, batch) in live.iter().enumerate() {
                if batch.is_some() {
                    *counts.entry(names[slot % names.len()].clone()).or_default() += 1;
                }
            }
            counts
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            for round in 0usize.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|stop| *stop) => break,
                }
                if live.is_empty() {
                    break;
                }
                let slot = round % live.len();
                if let Some(old) = &live[slot] {
                    if let Err(e) = batches.delete(old, &DeleteParams::default()).await {
                        // Still live: the slot keeps it and this round claims nothing.
                        tracing::warn!("churn release {old}: {e}");
                        continue;
                    }
                    churn.releases.fetch_add(1, Ordering::Relaxed);
                }
                let name = format!("churn-{round}");
                let pool = &pools[slot % pools.len()];
                match batches
                    .create(&PostParams::default(), &scene::pooled(&name, pool, 1))
                    .await
                {
                    Ok(_) => {
                        churn.claims.fetch_add(1, Ordering::Relaxed);
                        live[slot] = Some(name);
                    }
                    Err(e) => {
                        tracing::warn!("churn claim {name}: {e}");
                        live[slot] = None;
                    }
                }
            }
            live_per_pool(&live)
        })
    }

    /// Adds kwok nodes until `pods` more pods fit; returns their names.
    async fn add_nodes(&self, pods: usize) -> anyhow::Result<Vec<String>> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let capacity: usize = nodes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(scene::node_pod_capacity)
            .sum();
        let all_pods: Api<Pod> = Api::all(self.client.clone());
        let in_use = all_pods
            .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
            .await?
            .items
            .len();
        let count = scene::nodes_to_add(capacity, in_use, pods);
        if count == 0 {
            return Ok(Vec::new());
        }
        if count > 255 {
            bail!("{count} more kwok nodes would be needed; at most 255 can be added");
        }
        let prefix = format!("sandbox-bench-{}", std::process::id());
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
        println!("scale: nodes hold {capacity} pods ({in_use} in use); adding {count} kwok nodes");
        for (i, name) in names.iter().enumerate() {
            nodes
                .create(&PostParams::default(), &scene::kwok_node(name, i as u8))
                .await
                .with_context(|| format!("creating node {name}"))?;
        }
        let config = watcher::Config::default().labels("sandbox-bench=true");
        let mut ready = std::collections::HashSet::new();
        let mut stream = watcher(nodes, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        let wait = async {
            while let Some(node) = stream.try_next().await? {
                if names.contains(&node.name_any()) && scene::node_pod_capacity(&node) > 0 {
                    ready.insert(node.name_any());
                    if ready.len() == names.len() {
                        return Ok::<_, anyhow::Error>(());
                    }
                }
            }
            bail!("the node watch ended")
        };
        tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .context("kwok nodes not Ready within 120 s")??;
        Ok(names)
    }

    async fn remove_nodes(&self, names: &[String]) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        for name in names {
            nodes
                .delete(name, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting node {name}"))?;
        }
        Ok(())
    }

    /// Deletes every BatchSandbox and Pool and waits until their pods are gone.
    async fn empty_namespace(&self) -> anyhow::Result<()> {
        self.batches
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .context("deleting the bench's BatchSandboxes")?;
        self.wait_batches("every batch deleted", Duration::from_secs(600), |s| {
            s.present.is_empty()
        })
        .await?;
        self.pools
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .context("deleting the bench's Pools")?;
        let mut rx = self.pool_state.clone();
        wait_for(
            &mut rx,
            "every pool deleted",
            Duration::from_secs(600),
            |s| s.counts.is_empty(),
        )
        .await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), self.batches_namespace());
        wait_empty(
            pods,
            "pods of the bench namespace deleted",
            Duration::from_secs(900),
        )
        .await
    }

    fn batches_namespace(&self) -> &str {
        self.batches.namespace().unwrap_or("default")
    }
}

/// Waits until no object of `api` is left.
async fn wait_empty<K>(api: Api<K>, what: &str, timeout: Duration) -> anyhow::Result<()>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut left = std::collections::HashSet::new();
    let mut listed = false;
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let wait = async {
        while let Some(event) = stream.try_next().await? {
            match event {
                watcher::Event::Init => left.clear(),
                watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                    left.insert(o.name_any());
                }
                watcher::Event::Delete(o) => {
                    left.remove(&o.name_any());
                }
                watcher::Event::InitDone => listed = true,
            }
            if listed && left.is_empty() {
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("the watch ended")
    };
    tokio::time::timeout(timeout, wait)
        .await
        .with_context(|| format!("timed out after {timeout:?} waiting for {what}"))?
}

/// Refuses to measure when another controller reconciles `ns`: it would share the work and the
/// figures would not be one controller's. A probe Pool is created before the bench starts its
/// own controller; any controller that reconciles the namespace marks it (finalizer, status)
/// within `timeout`. A leader Lease would not tell: leader election is optional, and `make
/// dev-up`'s controller runs without it.
async fn refuse_foreign_controller(
    pools: &Api<Pool>,
    ns: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let probe = "sandbox-bench-probe";
    pools
        .create(&PostParams::default(), &scene::pool(probe, 0, 0, 0, 0))
        .await
        .context("creating the probe Pool (are the CRDs installed?)")?;
    let config = watcher::Config::default().fields(&format!("metadata.name={probe}"));
    let mut stream = watcher(pools.clone(), config)
        .default_backoff()
        .applied_objects()
        .boxed();
    let found = tokio::time::timeout(timeout, async {
        while let Some(pool) = stream.try_next().await? {
            if let Some(mark) = scene::foreign_marks(&pool) {
                return Ok::<_, anyhow::Error>(mark);
            }
        }
        bail!("the probe Pool's watch ended")
    })
    .await;
    // Without finalizers the probe goes at once; with one, the foreign controller removes it.
    let _ = pools
        .patch(
            probe,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await;
    let _ = pools.delete(probe, &DeleteParams::default()).await;
    match found {
        Err(_elapsed) => Ok(()),
        Ok(Ok(mark)) => bail!(
            "another controller reconciles namespace {ns}: it gave the probe Pool {probe} {mark} \
             before this bench started its own controller. The bench measures the one controller \
             it starts; stop the other (make dev-down, or stop the controller of make dev-up and \
             keep the cluster with deploy/local/cluster.sh up) and run it again"
        ),
        Ok(Err(e)) => Err(e.context("watching the probe Pool")),
    }
}

async fn start_controller(settings: &Settings, ns: &str) -> anyhow::Result<Controller> {
    let metrics = format!("127.0.0.1:{}", settings.metrics_port);
    let log_path = std::env::temp_dir().join(format!(
        "sandbox-bench-{}-controller.log",
        std::process::id()
    ));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    println!("controller log: {}", log_path.display());
    let child = Command::new(&settings.controller)
        // Pool pods without task-executor sidecars: the claim path is measured, not the local
        // executor runner's processes (one per pod).
        .args([
            "run",
            "--namespace",
            ns,
            "--health-addr",
            &metrics,
            "--pool-executor-injection",
            "annotated",
        ])
        .env("RUST_LOG", "warn")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", settings.controller.display()))?;
    let controller = Controller { child, metrics };
    scene::poll_until("controller ready", Duration::from_secs(60), || async {
        http_get(&controller.metrics, "/readyz")
            .await
            .is_ok_and(|b| b == "ready")
    })
    .await?;
    Ok(controller)
}

async fn delete_namespace(client: &Client, ns: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(ns, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting namespace {ns}"))?;
    Ok(())
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

fn fmt_counts(counts: &Counts) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_run(run: usize, f: &RunFigures) {
    println!(
        "  run {run}: batch of 100 {:.0} ms; burst p50 {:.0} ms (api {:.0} + controller {:.0}), p99 {:.0} ms; sequential p50 {:.0} ms; non-pooled 100 Ready {:.0} ms",
        f.batch100.map_or(0.0, |b| b.total_ms()),
        f.burst.latency.total.p50_ms,
        f.burst.latency.api.p50_ms,
        f.burst.latency.controller.p50_ms,
        f.burst.latency.total.p99_ms,
        f.sequential.latency.total.p50_ms,
        f.nonpooled_ms.unwrap_or(0.0),
    );
}

fn print_aggregate(a: &Aggregate) {
    let l = |name: &str, s: &super::report::LatencySummary| {
        println!(
            "{name} ({} claims): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; API server's share p50 {:.1} / p99 {:.1} ms; controller's share p50 {:.1} / p99 {:.1} ms; controller/API p50 {:.2}, p99 {:.2}",
            s.total.n,
            s.total.p50_ms,
            s.total.p99_ms,
            s.total.max_ms,
            s.api.p50_ms,
            s.api.p99_ms,
            s.controller.p50_ms,
            s.controller.p99_ms,
            s.controller_to_api_p50.unwrap_or(f64::NAN),
            s.controller_to_api_p99.unwrap_or(f64::NAN)
        );
        if let Some(ready) = &s.status_ready {
            println!(
                "  create call -> status ready (what OpenSandbox's server waits for): p50 {:.1} ms, p99 {:.1} ms",
                ready.p50_ms, ready.p99_ms
            );
        }
    };
    if let Some(ms) = a.batch100_ms {
        println!("pooled batch of 100 -> allocated with endpoints: median {ms:.1} ms");
    }
    l("100 concurrent claims", &a.burst);
    l("claims one at a time", &a.sequential);
    println!(
        "controller CPU per claim: burst {:.2} ms, one at a time {:.2} ms",
        a.burst_cpu_per_claim_ms.unwrap_or(f64::NAN),
        a.sequential_cpu_per_claim_ms.unwrap_or(f64::NAN)
    );
    println!(
        "controller writes per burst claim: {}",
        fmt_counts(&a.burst_controller_writes_per_claim)
    );
    println!(
        "apiserver writes per burst claim (all clients): {}",
        fmt_counts(&a.burst_apiserver_writes_per_claim)
    );
    println!(
        "controller reconciles per claim: burst {}; one at a time {}",
        fmt_counts(&a.burst_reconciles_per_claim),
        fmt_counts(&a.sequential_reconciles_per_claim)
    );
    println!(
        "policy decisions asked per claim: burst {}; one at a time {}",
        fmt_counts(&a.burst_policy_decisions_per_claim),
        fmt_counts(&a.sequential_policy_decisions_per_claim)
    );
    println!(
        "Pool reconciles asked for per claim, by cause: burst {}; one at a time {}",
        fmt_counts(&a.burst_pool_wakes_per_claim),
        fmt_counts(&a.sequential_pool_wakes_per_claim)
    );
    println!(
        "controller writes per sequential claim: {}",
        fmt_counts(&a.sequential_controller_writes_per_claim)
    );
    println!(
        "apiserver writes per sequential claim (all clients): {}",
        fmt_counts(&a.sequential_apiserver_writes_per_claim)
    );
    if let Some(ms) = a.nonpooled_ms {
        println!("non-pooled batch of 100 -> all Ready: median {ms:.1} ms");
    }
}

fn print_memory(m: &Memory) {
    println!(
        "controller memory: RSS {:.1} MiB, peak {:.1} MiB",
        m.rss_kib as f64 / 1024.0,
        m.peak_rss_kib as f64 / 1024.0
    );
}

fn print_normal(n: &NormalReport) {
    println!("== normal scene, {} run(s)", n.runs.len());
    print_aggregate(&n.aggregate);
    println!(
        "controller CPU for the whole scene: {:.2} s ({:.2} s since the process started)",
        n.cpu_ms / 1000.0,
        n.process_cpu_ms / 1000.0
    );
    print_memory(&n.memory);
}

fn print_scale(s: &ScaleReport) {
    println!(
        "== scale scene: {} pools x {} pods, {} live batches, {} nodes added; filled in {:.1} s (controller CPU {:.1} s); live batches allocated in {:.1} s; churn {} claims / {} releases; whole scene {:.1} s",
        s.pools,
        s.pods_per_pool,
        s.live_batches,
        s.nodes_added,
        s.fill_ms / 1000.0,
        s.fill_cpu_ms / 1000.0,
        s.live_ms / 1000.0,
        s.churn_claims,
        s.churn_releases,
        s.total_ms / 1000.0
    );
    print_aggregate(&s.aggregate);
    println!(
        "while claims flowed, until every pool's status caught up ({:.1} s): controller CPU per sandbox claimed {:.2} ms; controller writes per sandbox claimed: {}; reconciles per sandbox claimed: {}",
        s.flowing.wall_ms / 1000.0,
        s.flowing.cpu_per_claim_ms,
        fmt_counts(&s.flowing.controller_writes_per_claim),
        fmt_counts(&s.flowing.controller_reconciles_per_claim)
    );
    println!(
        "while claims flowed: Pool reconciles asked for per sandbox claimed, by cause: {}; policy decisions asked per sandbox claimed: {}",
        fmt_counts(&s.flowing.pool_wakes_per_claim),
        fmt_counts(&s.flowing.policy_decisions_per_claim)
    );
    print_memory(&s.memory);
}
