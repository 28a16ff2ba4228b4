//! The figures a run produces, as written to `--json`: per-claim samples and the summaries
//! computed from them.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::metrics::{self, Counts};
use super::procfs::Memory;
use super::stats::{self, Summary};

/// One claim's timeline, in milliseconds from its create call.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimSample {
    /// Create call -> first watch event of the batch (the API server's share).
    pub api_ms: f64,
    /// First watch event -> allocated with endpoints (the controller's share).
    pub controller_ms: f64,
    /// Create call -> the batch's `status.ready` counts every replica: what OpenSandbox's server
    /// waits for before it reports a sandbox Running. Absent from figures taken before it was
    /// measured, and for claims whose status was not awaited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_ready_ms: Option<f64>,
}

impl ClaimSample {
    pub fn total_ms(&self) -> f64 {
        self.api_ms + self.controller_ms
    }
}

/// Percentiles of a set of claims, split into the API server's and the controller's shares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub total: Summary,
    pub api: Summary,
    pub controller: Summary,
    /// Controller's share / API server's share, at p50 and at p99.
    pub controller_to_api_p50: Option<f64>,
    pub controller_to_api_p99: Option<f64>,
    /// Create call -> status ready, when every sample has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_ready: Option<Summary>,
}

impl LatencySummary {
    pub fn of(samples: &[ClaimSample]) -> Self {
        let total: Vec<f64> = samples.iter().map(ClaimSample::total_ms).collect();
        let api: Vec<f64> = samples.iter().map(|s| s.api_ms).collect();
        let controller: Vec<f64> = samples.iter().map(|s| s.controller_ms).collect();
        let (api, controller) = (Summary::of(&api), Summary::of(&controller));
        let status_ready: Option<Vec<f64>> = samples.iter().map(|s| s.status_ready_ms).collect();
        Self {
            total: Summary::of(&total),
            api,
            controller,
            controller_to_api_p50: stats::ratio(controller.p50_ms, api.p50_ms),
            controller_to_api_p99: stats::ratio(controller.p99_ms, api.p99_ms),
            status_ready: status_ready
                .filter(|ms| !ms.is_empty())
                .map(|ms| Summary::of(&ms)),
        }
    }
}

/// What a phase cost: wall time, the controller's CPU, and API writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseCost {
    pub wall_ms: f64,
    /// Controller process user+system CPU over the phase.
    pub cpu_ms: f64,
    pub cpu_per_claim_ms: f64,
    /// The controller's own write counters (by target) over the phase.
    pub controller_writes: Counts,
    pub controller_writes_per_claim: Counts,
    /// Write requests the apiserver served from every client (by resource and verb).
    pub apiserver_writes: Counts,
    pub apiserver_writes_per_claim: Counts,
    /// The controller's reconciles (by kind) over the phase; absent from figures taken before
    /// they were counted.
    #[serde(default)]
    pub controller_reconciles: Counts,
    #[serde(default)]
    pub controller_reconciles_per_claim: Counts,
    /// Policy decisions the controller asked for (by decision) over the phase; absent from
    /// figures taken before they were counted.
    #[serde(default)]
    pub policy_decisions: Counts,
    #[serde(default)]
    pub policy_decisions_per_claim: Counts,
    /// Pool reconciles asked for (by cause) over the phase; absent from figures taken before
    /// they were counted.
    #[serde(default)]
    pub pool_wakes: Counts,
    #[serde(default)]
    pub pool_wakes_per_claim: Counts,
}

/// What the counters grew by over a phase, each by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseCounts {
    pub controller_writes: Counts,
    pub apiserver_writes: Counts,
    pub controller_reconciles: Counts,
    pub policy_decisions: Counts,
    pub pool_wakes: Counts,
}

impl PhaseCost {
    pub fn new(claims: usize, wall_ms: f64, cpu_ms: f64, counts: PhaseCounts) -> Self {
        let per_claim = |c: &Counts| metrics::per_claim(c, claims);
        Self {
            wall_ms,
            cpu_ms,
            cpu_per_claim_ms: if claims == 0 {
                0.0
            } else {
                cpu_ms / claims as f64
            },
            controller_writes_per_claim: per_claim(&counts.controller_writes),
            apiserver_writes_per_claim: per_claim(&counts.apiserver_writes),
            controller_reconciles_per_claim: per_claim(&counts.controller_reconciles),
            policy_decisions_per_claim: per_claim(&counts.policy_decisions),
            pool_wakes_per_claim: per_claim(&counts.pool_wakes),
            controller_writes: counts.controller_writes,
            apiserver_writes: counts.apiserver_writes,
            controller_reconciles: counts.controller_reconciles,
            policy_decisions: counts.policy_decisions,
            pool_wakes: counts.pool_wakes,
        }
    }
}

/// A set of `replicas: 1` claims (concurrent or one at a time).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimPhase {
    pub samples: Vec<ClaimSample>,
    pub latency: LatencySummary,
    pub cost: PhaseCost,
}

impl ClaimPhase {
    pub fn new(samples: Vec<ClaimSample>, cost: PhaseCost) -> Self {
        Self {
            latency: LatencySummary::of(&samples),
            samples,
            cost,
        }
    }
}

/// The figures of one run of the scene.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFigures {
    /// One `replicas: 100` batch from a warm pool -> allocated with 100 endpoints.
    pub batch100: Option<ClaimSample>,
    /// 100 concurrent `replicas: 1` claims.
    pub burst: ClaimPhase,
    /// `replicas: 1` claims one after another.
    pub sequential: ClaimPhase,
    /// A non-pooled batch of 100 -> all Ready (not measured at scale).
    pub nonpooled_ms: Option<f64>,
}

/// Figures over all runs: latency percentiles over every run's samples, scalars as medians.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    pub batch100_ms: Option<f64>,
    pub burst: LatencySummary,
    pub sequential: LatencySummary,
    pub burst_cpu_per_claim_ms: Option<f64>,
    pub sequential_cpu_per_claim_ms: Option<f64>,
    /// Median over runs of the controller's writes per burst claim, by target.
    pub burst_controller_writes_per_claim: Counts,
    /// Median over runs of the apiserver's writes per burst claim, by resource and verb.
    pub burst_apiserver_writes_per_claim: Counts,
    pub sequential_controller_writes_per_claim: Counts,
    pub sequential_apiserver_writes_per_claim: Counts,
    /// Median over runs of the controller's reconciles per claim, by kind.
    #[serde(default)]
    pub burst_reconciles_per_claim: Counts,
    #[serde(default)]
    pub sequential_reconciles_per_claim: Counts,
    /// Median over runs of the policy decisions asked per claim, by decision.
    #[serde(default)]
    pub burst_policy_decisions_per_claim: Counts,
    #[serde(default)]
    pub sequential_policy_decisions_per_claim: Counts,
    /// Median over runs of the Pool reconciles asked for per claim, by cause.
    #[serde(default)]
    pub burst_pool_wakes_per_claim: Counts,
    #[serde(default)]
    pub sequential_pool_wakes_per_claim: Counts,
    pub nonpooled_ms: Option<f64>,
}

fn median_counts<'a>(runs: impl Iterator<Item = &'a Counts> + Clone) -> Counts {
    let keys: std::collections::BTreeSet<&String> = runs.clone().flat_map(|c| c.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let values: Vec<f64> = runs
                .clone()
                .map(|c| c.get(k).copied().unwrap_or(0.0))
                .collect();
            stats::median(&values).map(|m| (k.clone(), m))
        })
        .collect()
}

impl Aggregate {
    pub fn of(runs: &[RunFigures]) -> Self {
        let all = |f: fn(&RunFigures) -> &ClaimPhase| -> Vec<ClaimSample> {
            runs.iter().flat_map(|r| f(r).samples.clone()).collect()
        };
        let scalar = |f: &dyn Fn(&RunFigures) -> Option<f64>| -> Option<f64> {
            stats::median(&runs.iter().filter_map(f).collect::<Vec<_>>())
        };
        let counts = |f: fn(&RunFigures) -> &Counts| median_counts(runs.iter().map(f));
        Self {
            batch100_ms: scalar(&|r| r.batch100.map(|b| b.total_ms())),
            burst: LatencySummary::of(&all(|r| &r.burst)),
            sequential: LatencySummary::of(&all(|r| &r.sequential)),
            burst_cpu_per_claim_ms: scalar(&|r| Some(r.burst.cost.cpu_per_claim_ms)),
            sequential_cpu_per_claim_ms: scalar(&|r| Some(r.sequential.cost.cpu_per_claim_ms)),
            burst_controller_writes_per_claim: counts(|r| {
                &r.burst.cost.controller_writes_per_claim
            }),
            burst_apiserver_writes_per_claim: counts(|r| &r.burst.cost.apiserver_writes_per_claim),
            sequential_controller_writes_per_claim: counts(|r| {
                &r.sequential.cost.controller_writes_per_claim
            }),
            sequential_apiserver_writes_per_claim: counts(|r| {
                &r.sequential.cost.apiserver_writes_per_claim
            }),
            burst_reconciles_per_claim: counts(|r| &r.burst.cost.controller_reconciles_per_claim),
            sequential_reconciles_per_claim: counts(|r| {
                &r.sequential.cost.controller_reconciles_per_claim
            }),
            burst_policy_decisions_per_claim: counts(|r| &r.burst.cost.policy_decisions_per_claim),
            sequential_policy_decisions_per_claim: counts(|r| {
                &r.sequential.cost.policy_decisions_per_claim
            }),
            burst_pool_wakes_per_claim: counts(|r| &r.burst.cost.pool_wakes_per_claim),
            sequential_pool_wakes_per_claim: counts(|r| &r.sequential.cost.pool_wakes_per_claim),
            nonpooled_ms: scalar(&|r| r.nonpooled_ms),
        }
    }
}

/// The normal scene: a warm pool of about a hundred pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NormalReport {
    pub runs: Vec<RunFigures>,
    pub aggregate: Aggregate,
    /// Controller memory at the end of the scene.
    pub memory: Memory,
    /// Controller CPU over the whole scene: the warm pool's fill, every run's phases and the
    /// waits between them (the process's start-up is not in it).
    #[serde(default)]
    pub cpu_ms: f64,
    /// Controller CPU since the process started, read at the end of the scene.
    #[serde(default)]
    pub process_cpu_ms: f64,
}

/// The big scene: many pools and pods, live batches, claims and releases flowing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScaleReport {
    pub pools: usize,
    pub pods_per_pool: usize,
    pub live_batches: usize,
    /// Kwok nodes the bench added for the pods (deleted afterwards).
    pub nodes_added: usize,
    /// Pools created -> every pool full and its pods available.
    pub fill_ms: f64,
    /// Controller CPU while filling the pools.
    pub fill_cpu_ms: f64,
    /// Live batches created -> all allocated.
    pub live_ms: f64,
    /// Background claims and releases completed while measuring.
    pub churn_claims: usize,
    pub churn_releases: usize,
    /// From the churn's start until, after the phases, every pool's status shows its live
    /// batches again: the cost of claims and releases flowing, divided over every sandbox claimed
    /// (the phases' and the churn's), status writes that trailed the claims included.
    #[serde(default)]
    pub flowing: PhaseCost,
    pub run: RunFigures,
    pub aggregate: Aggregate,
    pub memory: Memory,
    /// Whole scale scene, setup to teardown.
    pub total_ms: f64,
}

/// `/proc/loadavg` at a moment of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    /// Seconds since the bench started.
    pub at_s: f64,
    pub phase: String,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

impl LoadSample {
    /// Parses the first three fields of `/proc/loadavg`.
    pub fn parse(at_s: f64, phase: &str, loadavg: &str) -> Option<Self> {
        let mut fields = loadavg.split_whitespace().map(str::parse::<f64>);
        Some(Self {
            at_s,
            phase: phase.to_owned(),
            load1: fields.next()?.ok()?,
            load5: fields.next()?.ok()?,
            load15: fields.next()?.ok()?,
        })
    }
}

/// Everything one invocation measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `release` or `debug`.
    pub profile: String,
    pub cpus: usize,
    pub started_unix_s: u64,
    pub load: Vec<LoadSample>,
    pub normal: Option<NormalReport>,
    pub scale: Option<ScaleReport>,
}

impl Report {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(samples: &[(f64, f64)], cpu_ms: f64, pod_writes: f64) -> ClaimPhase {
        let samples: Vec<ClaimSample> = samples
            .iter()
            .map(|&(api_ms, controller_ms)| ClaimSample {
                api_ms,
                controller_ms,
                status_ready_ms: Some(api_ms + controller_ms + 2.0),
            })
            .collect();
        let n = samples.len();
        ClaimPhase::new(
            samples,
            PhaseCost::new(
                n,
                1000.0,
                cpu_ms,
                PhaseCounts {
                    controller_writes: [("pod".to_owned(), pod_writes)].into(),
                    apiserver_writes: [("pods POST".to_owned(), pod_writes)].into(),
                    controller_reconciles: [("Pool".to_owned(), pod_writes * 3.0)].into(),
                    policy_decisions: [("expiry".to_owned(), pod_writes * 2.0)].into(),
                    pool_wakes: [("pod".to_owned(), pod_writes * 4.0)].into(),
                },
            ),
        )
    }

    #[test]
    fn latency_split_and_ratio() {
        let p = phase(&[(10.0, 30.0), (20.0, 60.0)], 100.0, 4.0);
        assert_eq!(p.latency.total.p50_ms, 40.0);
        assert_eq!(p.latency.api.p99_ms, 20.0);
        assert_eq!(p.latency.controller.p50_ms, 30.0);
        assert_eq!(p.latency.controller_to_api_p50, Some(3.0));
        assert_eq!(p.latency.status_ready.map(|s| s.p99_ms), Some(82.0));
        assert_eq!(p.cost.cpu_per_claim_ms, 50.0);
        assert_eq!(p.cost.controller_writes_per_claim["pod"], 2.0);
        assert_eq!(p.cost.controller_reconciles_per_claim["Pool"], 6.0);
        assert_eq!(p.cost.policy_decisions_per_claim["expiry"], 4.0);
        assert_eq!(p.cost.pool_wakes_per_claim["pod"], 8.0);
    }

    #[test]
    fn status_ready_is_summarised_only_when_every_claim_has_it() {
        let mut samples = phase(&[(1.0, 2.0), (3.0, 4.0)], 1.0, 1.0).samples;
        assert_eq!(
            LatencySummary::of(&samples).status_ready.map(|s| s.p50_ms),
            Some(5.0)
        );
        samples[1].status_ready_ms = None;
        assert_eq!(LatencySummary::of(&samples).status_ready, None);
        assert_eq!(LatencySummary::of(&[]).status_ready, None);
    }

    #[test]
    fn aggregate_pools_samples_and_takes_medians() {
        let run = |cpu: f64, writes: f64| RunFigures {
            batch100: Some(ClaimSample {
                api_ms: 5.0,
                controller_ms: cpu,
                status_ready_ms: None,
            }),
            burst: phase(&[(1.0, cpu)], cpu, writes),
            sequential: phase(&[(1.0, 1.0)], 1.0, 1.0),
            nonpooled_ms: Some(cpu),
        };
        let runs = [run(10.0, 3.0), run(30.0, 9.0), run(20.0, 6.0)];
        let agg = Aggregate::of(&runs);
        assert_eq!(agg.burst.total.n, 3);
        assert_eq!(agg.burst.controller.max_ms, 30.0);
        assert_eq!(agg.batch100_ms, Some(25.0));
        assert_eq!(agg.burst_cpu_per_claim_ms, Some(20.0));
        assert_eq!(agg.burst_controller_writes_per_claim["pod"], 6.0);
        assert_eq!(agg.burst_reconciles_per_claim["Pool"], 18.0);
        assert_eq!(agg.nonpooled_ms, Some(20.0));
    }

    #[test]
    fn json_round_trip() {
        let runs = vec![RunFigures {
            burst: phase(&[(1.5, 2.5), (3.0, 4.0)], 12.0, 2.0),
            ..Default::default()
        }];
        let report = Report {
            profile: "release".into(),
            cpus: 2,
            started_unix_s: 1,
            load: vec![LoadSample::parse(0.5, "burst", "1.00 1.37 1.76 2/94 11412").unwrap()],
            normal: Some(NormalReport {
                aggregate: Aggregate::of(&runs),
                runs,
                memory: Memory {
                    rss_kib: 1,
                    peak_rss_kib: 2,
                },
                cpu_ms: 3.0,
                process_cpu_ms: 4.0,
            }),
            scale: Some(ScaleReport {
                pools: 50,
                ..Default::default()
            }),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/report.json");
        report.write(&path).unwrap();
        assert_eq!(Report::read(&path).unwrap(), report);
    }

    #[test]
    fn loadavg_parse() {
        let s = LoadSample::parse(1.0, "x", "0.50 1.25 2.00 1/2 3").unwrap();
        assert_eq!((s.load1, s.load5, s.load15), (0.5, 1.25, 2.0));
        assert!(LoadSample::parse(1.0, "x", "").is_none());
    }
}
