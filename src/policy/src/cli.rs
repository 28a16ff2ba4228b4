//! `sandbox-controller policy check|test|bench`: try a policy component without a cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use sandbox_decisions::expiry::BatchSnapshot;
use sandbox_decisions::selection::{
    BatchRequirements, CandidatePool, ContainerRequirements, Label, PodRequirements,
    ResourceRequest, SelectionInput,
};
use sandbox_decisions::sizing::{AllocationEvent, Bounds, PoolSnapshot};
use sandbox_decisions::tasks::{EnvVar, ProcessTask, TaskPhase, TaskSpec, TaskTemplateSpec};

use crate::host::Limits;
use crate::wasm::{PolicyInput, Source, WasmPolicies};
use crate::{Decision, NativePolicies, Outcome, PolicyEngine, ShardTaskInput};

/// Work with policy components.
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Check that a component implements a policy world and accepts its settings.
    Check(CheckArgs),
    /// Run one decision of a component on an input and print it, as the controller would.
    Test(TestArgs),
    /// Measure the per-decision cost (fresh instance + call + validation) of the default policies.
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// The component (`.wasm`).
    pub file: PathBuf,
    /// Settings JSON file (default: `<file>.json` beside the component if present, else `{}`).
    #[arg(long)]
    pub settings: Option<PathBuf>,
}

#[derive(Args)]
pub struct TestArgs {
    /// The component (`.wasm`).
    pub file: PathBuf,
    /// The decision's input as JSON (`-`: stdin). Fields left out take neutral defaults and `now`
    /// defaults to the current time. Shapes: see `policies/examples/inputs/`.
    #[arg(long)]
    pub input: PathBuf,
    /// Which decision to run: pool-sizing, shard-tasks, expiry or pool-selection (default: the
    /// only one the component implements).
    #[arg(long)]
    pub decision: Option<String>,
    /// Settings JSON file (default: `<file>.json` beside the component if present, else `{}`).
    #[arg(long)]
    pub settings: Option<PathBuf>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Decisions measured per policy.
    #[arg(long, default_value_t = 5000)]
    pub runs: usize,
}

/// Exit status: all good.
pub const EXIT_OK: i32 = 0;
/// Exit status: the component does not load (or `check` found a problem).
pub const EXIT_FAILED: i32 = 1;
/// Exit status of `test`: the decision is a fallback (`degraded` says why).
pub const EXIT_DEGRADED: i32 = 3;

/// Runs a `policy` subcommand; returns the process exit status.
pub fn run(command: PolicyCommand) -> anyhow::Result<i32> {
    match command {
        PolicyCommand::Check(args) => check(&args),
        PolicyCommand::Test(args) => test(&args),
        PolicyCommand::Bench(args) => bench(&args),
    }
}

/// The name the CLI loads the component under.
const CLI_POLICY: &str = "cli";

fn read_input(file: &Path, settings: Option<&Path>) -> anyhow::Result<PolicyInput> {
    let wasm = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let settings = match settings {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => std::fs::read_to_string(file.with_extension("json")).ok(),
    };
    Ok(PolicyInput {
        wasm,
        settings,
        pinned_sha256: None,
    })
}

fn check(args: &CheckArgs) -> anyhow::Result<i32> {
    let input = read_input(&args.file, args.settings.as_deref())?;
    let policies = WasmPolicies::new(Limits::default())?;
    let compiled = match policies.host().compile(&input.wasm) {
        Ok(compiled) => compiled,
        Err(error) => {
            println!("{}: {error}", args.file.display());
            return Ok(EXIT_FAILED);
        }
    };
    println!(
        "{}: sha256 {} ({} bytes)",
        args.file.display(),
        compiled.digest,
        compiled.size_bytes
    );
    for decision in Decision::ALL {
        match compiled.why_not(decision) {
            None => println!("  implements {} ({decision})", decision.world()),
            Some(why) => println!("  does not implement {}: {why}", decision.world()),
        }
    }
    match policies.load(
        CLI_POLICY,
        Source::Directory,
        &args.file.display().to_string(),
        &input,
    ) {
        Ok(_) => {
            println!("  settings accepted");
            Ok(EXIT_OK)
        }
        Err(error) => {
            println!("  not loadable: {error}");
            Ok(EXIT_FAILED)
        }
    }
}

/// Output of `policy test`.
#[derive(Serialize)]
struct TestOutput<T> {
    decision: T,
    degraded: Option<String>,
}

fn test(args: &TestArgs) -> anyhow::Result<i32> {
    let (output, code) = run_test(args)?;
    println!("{output}");
    Ok(code)
}

/// The JSON `policy test` prints, and its exit status.
fn run_test(args: &TestArgs) -> anyhow::Result<(String, i32)> {
    let input = read_input(&args.file, args.settings.as_deref())?;
    let policies = WasmPolicies::new(Limits::default())?;
    if let Err(error) = policies.load(
        CLI_POLICY,
        Source::Directory,
        &args.file.display().to_string(),
        &input,
    ) {
        bail!("{} does not load: {error}", args.file.display());
    }
    let implemented = policies
        .status()
        .into_iter()
        .flat_map(|s| s.decisions)
        .collect::<Vec<_>>();
    let decision = match args.decision.as_deref() {
        Some(name) => Decision::from_name(name).with_context(|| {
            format!(
                "unknown decision {name:?}; use pool-sizing, shard-tasks, expiry or pool-selection"
            )
        })?,
        None => match implemented.as_slice() {
            [only] => *only,
            _ => bail!("the component implements {implemented:?}; choose one with --decision"),
        },
    };
    let text = if args.input == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the input from stdin")?
    } else {
        std::fs::read_to_string(&args.input)
            .with_context(|| format!("reading {}", args.input.display()))?
    };
    let given: Value = serde_json::from_str(&text).context("the input is not JSON")?;
    let now = now_unix_ms();
    let selector = Some(CLI_POLICY);
    let (output, degraded) = match decision {
        Decision::PoolSizing => {
            let pool: PoolSnapshot = with_defaults(
                PoolSnapshot {
                    now_unix_ms: now,
                    ..Default::default()
                },
                given,
            )?;
            render(policies.pool_sizing(selector, &pool))?
        }
        Decision::ShardTasks => {
            let batch: ShardTaskInput = with_defaults(ShardTaskInput::default(), given)?;
            render(policies.shard_tasks(selector, &batch))?
        }
        Decision::Expiry => {
            let batch: BatchSnapshot = with_defaults(
                BatchSnapshot {
                    now_unix_ms: now,
                    ..Default::default()
                },
                given,
            )?;
            render(policies.expiry(selector, &batch))?
        }
        Decision::PoolSelection => {
            let input: SelectionInput = with_defaults(SelectionInput::default(), given)?;
            render(policies.pool_selection(selector, &input))?
        }
    };
    Ok((output, if degraded { EXIT_DEGRADED } else { EXIT_OK }))
}

/// The outcome as `policy test` prints it, and whether it is degraded.
fn render<T: Serialize>(outcome: Outcome<T>) -> anyhow::Result<(String, bool)> {
    let degraded = outcome.degraded.is_some();
    let output = TestOutput {
        decision: outcome.decision,
        degraded: outcome.degraded,
    };
    Ok((serde_json::to_string_pretty(&output)?, degraded))
}

/// `given` laid over `default`, so an input may leave out any field.
fn with_defaults<T: Serialize + DeserializeOwned>(default: T, given: Value) -> anyhow::Result<T> {
    let mut merged = serde_json::to_value(default)?;
    overlay(&mut merged, given);
    serde_json::from_value(merged).context("the input does not have this decision's shape")
}

fn overlay(base: &mut Value, given: Value) {
    match (base, given) {
        (Value::Object(base), Value::Object(given)) => {
            for (key, value) in given {
                match base.get_mut(&key) {
                    Some(slot) => overlay(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, given) => *slot = given,
    }
}

fn now_unix_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Representative inputs: a busy pool, a heterogeneous batch of 10, an expiring batch of 10, and
/// a batch choosing among 20 pools of which some fit.
pub fn bench_inputs() -> (PoolSnapshot, ShardTaskInput, BatchSnapshot, SelectionInput) {
    let now = 1_800_000_000_000;
    let pool = PoolSnapshot {
        pool_name: "bench".into(),
        bounds: Bounds {
            buffer_min: 5,
            buffer_max: 20,
            pool_min: 10,
            pool_max: 500,
        },
        total: 120,
        allocated: 100,
        available: 15,
        pending: 5,
        terminating: 2,
        unmet_demand: 7,
        recent_allocations: (0..64)
            .map(|i| AllocationEvent {
                at_unix_ms: now - 60_000 + i * 900,
                count: 2,
            })
            .collect(),
        now_unix_ms: now,
    };
    let task = |command: &str, env: &[(&str, &str)]| TaskTemplateSpec {
        spec: Some(TaskSpec {
            process: Some(ProcessTask {
                command: Some(vec![command.into()]),
                args: Some(vec!["-c".into(), "run --fast".into()]),
                env: Some(
                    env.iter()
                        .map(|(n, v)| EnvVar {
                            name: (*n).into(),
                            value: Some((*v).into()),
                        })
                        .collect(),
                ),
                working_dir: None,
            }),
            timeout_seconds: Some(600),
        }),
    };
    let batch = ShardTaskInput {
        batch_name: "bench".into(),
        replicas: 10,
        task_template: Some(task("sh", &[("A", "1"), ("B", "2"), ("C", "3")])),
        shard_patches: (0..3)
            .map(|i| task("python", &[("B", "patched"), (["X", "Y", "Z"][i], "new")]))
            .collect(),
    };
    let expiring = BatchSnapshot {
        name: "bench".into(),
        expire_time_unix_ms: Some(now + 3_600_000),
        now_unix_ms: now,
        pooled: true,
        task_phases: vec![TaskPhase::Running; 10],
    };
    (pool, batch, expiring, bench_selection())
}

fn bench_selection() -> SelectionInput {
    let template = |image: &str, cpu: &str, memory: &str, zone: &str| PodRequirements {
        containers: vec![ContainerRequirements {
            image: image.into(),
            requests: vec![
                ResourceRequest {
                    name: "cpu".into(),
                    quantity: cpu.into(),
                },
                ResourceRequest {
                    name: "memory".into(),
                    quantity: memory.into(),
                },
            ],
        }],
        node_selector: vec![Label::new("topology.kubernetes.io/zone", zone)],
    };
    let images = ["python:3.12", "node:22", "golang:1.24", "python:3.12"];
    let pools = (0..20u32)
        .map(|i| CandidatePool {
            pool_name: format!("pool-{i:02}"),
            labels: vec![Label::new("team", "sandbox")],
            template: template(
                images[i as usize % images.len()],
                ["250m", "500m", "1", "2"][i as usize % 4],
                ["512Mi", "1Gi", "2Gi", "4G"][i as usize % 4],
                ["a", "b"][i as usize % 2],
            ),
            bounds: Bounds {
                buffer_min: 2,
                buffer_max: 10,
                pool_min: 5,
                pool_max: 100,
            },
            total: 40,
            allocated: (i * 7) % 40,
            idle: 40 - (i * 7) % 40,
        })
        .collect();
    SelectionInput {
        batch: BatchRequirements {
            batch_name: "bench".into(),
            replicas: 10,
            template: template("python:3.12", "500m", "1Gi", "b"),
        },
        pools,
    }
}

fn bench(args: &BenchArgs) -> anyhow::Result<i32> {
    let runs = args.runs.max(10);
    let started = Instant::now();
    let policies = WasmPolicies::new(Limits::default())?;
    println!(
        "engine start + compiling the {} embedded defaults: {:.1} ms",
        Decision::ALL.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let (pool, batch, expiring, selection) = bench_inputs();
    println!(
        "{runs} decisions each (fresh instance + call + output validation), after 100 warm-up calls:"
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9}   {:>12}",
        "policy", "p50 µs", "p99 µs", "max µs", "mean µs", "native p50 µs"
    );
    let mut degraded = 0usize;
    let mut report = |name: &str, wasm: &mut dyn FnMut() -> bool, native: &mut dyn FnMut()| {
        let samples = measure(runs, || degraded += usize::from(wasm()));
        let native = measure(runs, native);
        println!(
            "{name:<12} {:>9.1} {:>9.1} {:>9.1} {:>9.1}   {:>12.2}",
            micros(percentile(&samples, 0.50)),
            micros(percentile(&samples, 0.99)),
            micros(samples.last().copied().unwrap_or_default()),
            micros(samples.iter().sum::<Duration>() / samples.len().max(1) as u32),
            micros(percentile(&native, 0.50)),
        );
    };
    report(
        "pool-sizing",
        &mut || policies.pool_sizing(None, &pool).degraded.is_some(),
        &mut || {
            drop(std::hint::black_box(
                NativePolicies.pool_sizing(None, &pool),
            ))
        },
    );
    report(
        "shard-tasks",
        &mut || policies.shard_tasks(None, &batch).degraded.is_some(),
        &mut || {
            drop(std::hint::black_box(
                NativePolicies.shard_tasks(None, &batch),
            ))
        },
    );
    report(
        "expiry",
        &mut || policies.expiry(None, &expiring).degraded.is_some(),
        &mut || drop(std::hint::black_box(NativePolicies.expiry(None, &expiring))),
    );
    report(
        "pool-select",
        &mut || policies.pool_selection(None, &selection).degraded.is_some(),
        &mut || {
            drop(std::hint::black_box(
                NativePolicies.pool_selection(None, &selection),
            ))
        },
    );
    if degraded > 0 {
        println!("{degraded} decision(s) degraded: the figures include fallbacks");
        return Ok(EXIT_FAILED);
    }
    Ok(EXIT_OK)
}

/// Sorted durations of `runs` calls of `f`, after a warm-up.
fn measure(runs: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..100 {
        f();
    }
    let mut samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    samples.sort();
    samples
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_may_leave_out_fields() {
        let pool: PoolSnapshot = with_defaults(
            PoolSnapshot {
                now_unix_ms: 7,
                ..Default::default()
            },
            serde_json::json!({"bounds": {"pool_max": 9}, "total": 3}),
        )
        .unwrap();
        assert_eq!(
            (
                pool.bounds.pool_max,
                pool.bounds.pool_min,
                pool.total,
                pool.now_unix_ms
            ),
            (9, 0, 3, 7)
        );
    }

    fn example_input(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../policies/examples/inputs")
            .join(name)
    }

    #[test]
    fn policy_test_runs_the_default_pool_selection_on_the_example_input() {
        let args = TestArgs {
            file: crate::embedded::built_component("default-pool-selection"),
            input: example_input("pool-selection.json"),
            decision: None,
            settings: None,
        };
        let (output, code) = run_test(&args).expect("policy test runs");
        assert_eq!(code, EXIT_OK, "{output}");
        let output: Value = serde_json::from_str(&output).expect("JSON output");
        assert_eq!(output["decision"]["pool"], "python-quiet", "{output}");
        let reason = output["decision"]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("node-pool: images [node:22] not [python:3.12]"),
            "{reason}"
        );
        assert_eq!(output["degraded"], Value::Null);
    }

    #[test]
    fn policy_test_reports_an_invalid_pool_selection_as_degraded() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let settings = dir.path().join("garbage.json");
        std::fs::write(&settings, r#"{"mode": "garbage"}"#).expect("settings");
        let args = TestArgs {
            file: crate::embedded::built_component("hostile"),
            input: example_input("pool-selection.json"),
            decision: Some("pool-selection".into()),
            settings: Some(settings),
        };
        let (output, code) = run_test(&args).expect("policy test runs");
        assert_eq!(code, EXIT_DEGRADED, "{output}");
        let output: Value = serde_json::from_str(&output).expect("JSON output");
        // The fail-safe is the built-in default's choice.
        assert_eq!(output["decision"]["pool"], "python-quiet", "{output}");
        assert!(
            output["degraded"]
                .as_str()
                .is_some_and(|d| d.contains("not one of the candidate pools")),
            "{output}"
        );
    }

    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 0.5), Duration::from_micros(51));
        assert_eq!(percentile(&samples, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }
}
