//! Tests of the WebAssembly policies: the embedded defaults against the native decisions, hostile
//! guests against the host's limits, and loading and reloading.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use sandbox_decisions::checks;
use sandbox_decisions::expiry::{BatchSnapshot, ExpireAction, ExpiryDecision};
use sandbox_decisions::selection::{
    self, BatchRequirements, CandidatePool, ContainerRequirements, Label, PodRequirements,
    ResourceRequest, SelectionInput,
};
use sandbox_decisions::sizing::{AllocationEvent, Bounds, PoolSnapshot};
use sandbox_decisions::tasks::{
    EnvVar, ProcessTask, TaskPhase, TaskSpec, TaskTemplateSpec, template_merge,
};

use crate::embedded;
use crate::host::{CallClass, CallError, Limits, LoadError};
use crate::kind::ShardTasksKind;
use crate::registry::{self, PolicyRegistry, RegistryConfig};
use crate::wasm::{PolicyInput, Source, WasmPolicies};
use crate::{Decision, DegradedReason, NativePolicies, Outcome, PolicyEngine, ShardTaskInput};

/// One engine for the tests that need no special limits: compiling the defaults takes a while in
/// debug builds.
fn shared() -> &'static WasmPolicies {
    static POLICIES: OnceLock<WasmPolicies> = OnceLock::new();
    POLICIES
        .get_or_init(|| WasmPolicies::new(Limits::default()).expect("the embedded defaults load"))
}

fn built(crate_name: &str) -> Vec<u8> {
    let path = embedded::built_component(crate_name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn input(crate_name: &str, settings: &str) -> PolicyInput {
    PolicyInput {
        wasm: built(crate_name),
        settings: Some(settings.into()),
        pinned_sha256: None,
    }
}

fn hostile(mode: &str) -> PolicyInput {
    input("hostile", &format!(r#"{{"mode": "{mode}"}}"#))
}

fn pool(total: u32, allocated: u32, unmet: u32) -> PoolSnapshot {
    PoolSnapshot {
        pool_name: "p".into(),
        bounds: Bounds {
            buffer_min: 2,
            buffer_max: 4,
            pool_min: 1,
            pool_max: 30,
        },
        total,
        allocated,
        unmet_demand: unmet,
        now_unix_ms: 1_800_000_000_000,
        ..Default::default()
    }
}

fn batch(replicas: u32) -> ShardTaskInput {
    let spec = TaskSpec {
        process: Some(ProcessTask {
            command: Some(vec!["sleep".into()]),
            args: Some(vec!["1".into()]),
            ..Default::default()
        }),
        timeout_seconds: Some(30),
    };
    ShardTaskInput {
        batch_name: "b".into(),
        replicas,
        task_template: Some(TaskTemplateSpec { spec: Some(spec) }),
        shard_patches: vec![],
    }
}

fn expiring(expire_in_ms: i64, phases: Vec<TaskPhase>) -> BatchSnapshot {
    let now = 1_800_000_000_000;
    BatchSnapshot {
        name: "b".into(),
        expire_time_unix_ms: Some(now + expire_in_ms),
        now_unix_ms: now,
        pooled: true,
        task_phases: phases,
    }
}

// ---- the embedded defaults make the native decisions ----

fn arb_bound() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..60, 1 => any::<u32>()]
}

fn arb_pool() -> impl Strategy<Value = PoolSnapshot> {
    let counts = (
        arb_bound(),
        arb_bound(),
        0u32..50,
        0u32..50,
        0u32..10,
        arb_bound(),
    );
    let bounds = (arb_bound(), arb_bound(), arb_bound(), arb_bound());
    let history = prop::collection::vec((0i64..1_000_000, 1u32..10), 0..8);
    ("[a-z]{0,8}", bounds, counts, history).prop_map(
        |(
            pool_name,
            (buffer_min, buffer_max, pool_min, pool_max),
            (total, allocated, available, pending, terminating, unmet_demand),
            history,
        )| {
            PoolSnapshot {
                pool_name,
                bounds: Bounds {
                    buffer_min,
                    buffer_max,
                    pool_min,
                    pool_max,
                },
                total,
                allocated,
                available,
                pending,
                terminating,
                unmet_demand,
                recent_allocations: history
                    .into_iter()
                    .map(|(at_unix_ms, count)| AllocationEvent { at_unix_ms, count })
                    .collect(),
                now_unix_ms: 1_000_000,
            }
        },
    )
}

fn arb_words() -> impl Strategy<Value = Option<Vec<String>>> {
    prop::option::of(prop::collection::vec("[a-z ]{0,5}", 0..3))
}

fn arb_template(positive_timeouts: bool) -> impl Strategy<Value = TaskTemplateSpec> {
    let env = prop::option::of(prop::collection::vec(
        ("[A-D]", prop::option::of("[a-z]{0,3}")),
        0..5,
    ));
    let timeout = if positive_timeouts {
        prop::option::of(1i64..100_000).boxed()
    } else {
        prop::option::of(any::<i64>()).boxed()
    };
    let process = prop::option::of((
        arb_words(),
        arb_words(),
        env,
        prop::option::of("/[a-z]{1,4}"),
    ));
    prop::option::of((process, timeout)).prop_map(|spec| TaskTemplateSpec {
        spec: spec.map(|(process, timeout_seconds)| TaskSpec {
            process: process.map(|(command, args, env, working_dir)| ProcessTask {
                command,
                args,
                env: env.map(|pairs| {
                    pairs
                        .into_iter()
                        .map(|(name, value)| EnvVar { name, value })
                        .collect()
                }),
                working_dir,
            }),
            timeout_seconds,
        }),
    })
}

fn arb_batch(positive_timeouts: bool) -> impl Strategy<Value = ShardTaskInput> {
    (
        "[a-z]{1,8}",
        0u32..24,
        prop::option::of(arb_template(positive_timeouts)),
        prop::collection::vec(arb_template(positive_timeouts), 0..6),
    )
        .prop_map(
            |(batch_name, replicas, task_template, shard_patches)| ShardTaskInput {
                batch_name,
                replicas,
                task_template,
                shard_patches,
            },
        )
}

fn arb_phase() -> impl Strategy<Value = TaskPhase> {
    prop_oneof![
        Just(TaskPhase::None),
        Just(TaskPhase::Pending),
        Just(TaskPhase::Running),
        Just(TaskPhase::Succeeded),
        Just(TaskPhase::Failed),
        Just(TaskPhase::Unknown),
    ]
}

fn arb_expiring() -> impl Strategy<Value = BatchSnapshot> {
    // Timestamps within ±30,000 years of the epoch: far beyond any real expireTime.
    let instant = -1_000_000_000_000_000i64..1_000_000_000_000_000;
    let near = -100_000i64..100_000;
    (
        prop::option::of(prop_oneof![instant.clone(), near.clone()]),
        prop_oneof![instant, near],
        any::<bool>(),
        prop::collection::vec(arb_phase(), 0..6),
    )
        .prop_map(
            |(expire_time_unix_ms, now_unix_ms, pooled, task_phases)| BatchSnapshot {
                name: "b".into(),
                expire_time_unix_ms,
                now_unix_ms,
                pooled,
                task_phases,
            },
        )
}

fn arb_requirements() -> impl Strategy<Value = PodRequirements> {
    let quantity = prop::sample::select(vec![
        "100m", "0.5", "1", "2", "1500m", "256Mi", "1Gi", "1G", "1e9", "lots", "",
    ]);
    let request = (
        prop::sample::select(vec!["cpu", "memory", "nvidia.com/gpu"]),
        quantity,
    )
        .prop_map(|(name, quantity)| ResourceRequest {
            name: name.into(),
            quantity: quantity.into(),
        });
    let container = (
        prop::sample::select(vec!["python:3.12", "node:22", ""]),
        prop::collection::vec(request, 0..3),
    )
        .prop_map(|(image, requests)| ContainerRequirements {
            image: image.into(),
            requests,
        });
    let label = (
        prop::sample::select(vec!["zone", "arch"]),
        prop::sample::select(vec!["a", "b"]),
    )
        .prop_map(|(k, v)| Label::new(k, v));
    (
        prop::collection::vec(container, 0..3),
        prop::collection::vec(label, 0..2),
    )
        .prop_map(|(containers, node_selector)| PodRequirements {
            containers,
            node_selector,
        })
}

fn arb_selection() -> impl Strategy<Value = SelectionInput> {
    let label = (
        prop::sample::select(vec!["zone", "arch"]),
        prop::sample::select(vec!["a", "b"]),
    )
        .prop_map(|(k, v)| Label::new(k, v));
    let pool = (
        "[a-d]{1,2}",
        prop::collection::vec(label, 0..2),
        arb_requirements(),
        (arb_bound(), arb_bound(), arb_bound(), arb_bound()),
        (arb_bound(), arb_bound(), arb_bound()),
    )
        .prop_map(
            |(pool_name, labels, template, bounds, (total, allocated, idle))| CandidatePool {
                pool_name,
                labels,
                template,
                bounds: Bounds {
                    buffer_min: bounds.0,
                    buffer_max: bounds.1,
                    pool_min: bounds.2,
                    pool_max: bounds.3,
                },
                total,
                allocated,
                idle,
            },
        );
    (
        "[a-z]{0,8}",
        arb_bound(),
        arb_requirements(),
        prop::collection::vec(pool, 0..8),
    )
        .prop_map(|(batch_name, replicas, template, mut pools)| {
            pools.sort_by(|a, b| a.pool_name.cmp(&b.pool_name));
            pools.dedup_by(|a, b| a.pool_name == b.pool_name);
            SelectionInput {
                batch: BatchRequirements {
                    batch_name,
                    replicas,
                    template,
                },
                pools,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn default_pool_selection_matches_native(input in arb_selection()) {
        let wasm = shared().pool_selection(None, &input);
        prop_assert_eq!(wasm, NativePolicies.pool_selection(None, &input));
    }

    #[test]
    fn default_pool_sizing_matches_native(pool in arb_pool()) {
        let wasm = shared().pool_sizing(None, &pool);
        prop_assert_eq!(wasm, NativePolicies.pool_sizing(None, &pool));
    }

    #[test]
    fn default_shard_tasks_match_native(batch in arb_batch(true)) {
        let wasm = shared().shard_tasks(None, &batch);
        prop_assert_eq!(wasm, NativePolicies.shard_tasks(None, &batch));
    }

    #[test]
    fn default_shard_tasks_compute_native_merge_even_for_inputs_admission_rejects(batch in arb_batch(false)) {
        let policies = shared();
        let raw = policies.host().decide::<ShardTasksKind>(policies.default_policy(Decision::ShardTasks), CallClass::Default, "{}", &batch);
        prop_assert_eq!(raw, Ok(Some(template_merge(&batch))));
    }

    #[test]
    fn default_expiry_matches_native(batch in arb_expiring()) {
        let wasm = shared().expiry(None, &batch);
        prop_assert_eq!(wasm, NativePolicies.expiry(None, &batch));
    }
}

#[test]
#[cfg_attr(
    not(policies_from_source),
    ignore = "the wasm32-wasip2 target is missing, so the build embedded policies/prebuilt/ itself"
)]
fn the_committed_prebuilt_components_match_the_sources() {
    // Used by builds without the wasm32-wasip2 target; stale copies would embed old decisions.
    let prebuilt = std::path::Path::new(env!("SANDBOX_POLICY_PREBUILT_DIR"));
    let mut compared = 0;
    for entry in
        std::fs::read_dir(embedded::built_components_dir()).expect("the build's components")
    {
        let built = entry.expect("a directory entry").path();
        let name = built
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .to_string();
        let committed = std::fs::read(prebuilt.join(&name)).unwrap_or_default();
        assert!(
            committed == std::fs::read(&built).expect("a built component"),
            "policies/prebuilt/{name} differs from a build of its sources: run `make policies` and commit it"
        );
        compared += 1;
    }
    assert_eq!(compared, 7, "every component is compared");
}

#[test]
fn the_defaults_import_nothing() {
    // A component with imports carries adapter modules that every instantiation sets up too.
    let engine = wasmtime::Engine::default();
    for decision in Decision::ALL {
        let component =
            wasmtime::component::Component::new(&engine, embedded::default_component(decision))
                .expect("a default compiles");
        let imports: Vec<String> = component
            .component_type()
            .imports(&engine)
            .map(|(name, _)| name.to_string())
            .collect();
        assert!(imports.is_empty(), "{decision:?} imports {imports:?}");
    }
}

#[test]
fn defaults_take_no_settings() {
    let policies = shared();
    for decision in Decision::ALL {
        let default = policies.default_policy(decision);
        assert_eq!(
            policies.host().validate_settings(default, decision, "{}"),
            Ok(())
        );
        assert!(matches!(
            policies
                .host()
                .validate_settings(default, decision, r#"{"x": 1}"#),
            Err(CallError::Refused(_))
        ));
    }
}

// ---- hostile policies: every failure falls back, is reported and counted, and the host stays up ----

/// Loads `input` as `name` into a fresh engine with `limits`.
fn engine_with(name: &str, input: &PolicyInput, limits: Limits) -> WasmPolicies {
    let policies = WasmPolicies::new(limits).expect("the embedded defaults load");
    policies
        .load(name, Source::Directory, "test", input)
        .expect("the policy loads");
    policies
}

/// Asserts every decision of `mode` falls back with a reason naming `expected`, is counted under
/// `kind`, and the engine still decides by default afterwards.
fn assert_all_fall_back(policies: &WasmPolicies, expected: &str, kind: DegradedReason) {
    let p = pool(7, 5, 0);
    let sizing = policies.pool_sizing(Some("bad"), &p);
    assert_eq!(sizing.decision, checks::fallback_sizing(&p));
    assert_eq!(
        sizing.decision.desired_total, 7,
        "keeps the current size within bounds"
    );
    let reason = sizing.degraded.expect("sizing is degraded");
    assert!(
        reason.contains(expected),
        "{reason:?} should mention {expected:?}"
    );

    let tasks = policies.shard_tasks(Some("bad"), &batch(3));
    assert_eq!(tasks.decision, None, "no tasks are dispatched");
    assert!(tasks.degraded.is_some_and(|r| r.contains(expected)));

    let exp = policies.expiry(Some("bad"), &expiring(-1000, vec![]));
    assert_eq!(
        exp.decision,
        ExpiryDecision::Keep {
            recheck_after_ms: Some(checks::FALLBACK_RECHECK_MS)
        }
    );
    assert!(exp.degraded.is_some_and(|r| r.contains(expected)));

    let choice = selection_input();
    let selected = policies.pool_selection(Some("bad"), &choice);
    assert_eq!(
        selected.decision,
        selection::least_allocated_fit(&choice),
        "the built-in default chooses"
    );
    assert_eq!(selected.decision.pool.as_deref(), Some("fits"));
    assert!(selected.degraded.is_some_and(|r| r.contains(expected)));

    for decision in Decision::ALL {
        assert_eq!(
            policies.metrics().degraded_count(decision, kind),
            1,
            "{decision} counted under {kind:?}"
        );
    }
    // The engine is unharmed: the defaults still decide, undegraded.
    assert_eq!(
        policies.pool_sizing(None, &p),
        NativePolicies.pool_sizing(None, &p)
    );
    assert_eq!(
        policies.expiry(None, &expiring(-1, vec![])).decision,
        ExpiryDecision::Expire {
            action: ExpireAction::Delete
        }
    );
}

/// Two pools, of which only `fits` runs the batch's image.
fn selection_input() -> SelectionInput {
    let template = |image: &str| PodRequirements {
        containers: vec![ContainerRequirements {
            image: image.into(),
            requests: vec![],
        }],
        node_selector: vec![],
    };
    let pool = |name: &str, image: &str| CandidatePool {
        pool_name: name.into(),
        template: template(image),
        bounds: Bounds {
            pool_max: 10,
            ..Bounds::default()
        },
        ..CandidatePool::default()
    };
    SelectionInput {
        batch: BatchRequirements {
            batch_name: "b".into(),
            replicas: 1,
            template: template("python:3.12"),
        },
        pools: vec![pool("fits", "python:3.12"), pool("other", "node:22")],
    }
}

#[test]
fn an_infinite_loop_runs_out_of_fuel() {
    let policies = engine_with("bad", &hostile("loop"), Limits::default());
    let started = Instant::now();
    assert_all_fall_back(&policies, "ran out of fuel", DegradedReason::OutOfFuel);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn an_infinite_loop_hits_the_wall_clock_limit_when_fuel_is_plentiful() {
    let limits = Limits {
        fuel: 1 << 60,
        timeout: Duration::from_millis(50),
        ..Limits::default()
    };
    let policies = engine_with("bad", &hostile("loop"), limits);
    let started = Instant::now();
    assert_all_fall_back(
        &policies,
        "exceeded its time limit",
        DegradedReason::Timeout,
    );
    // Four looping calls of 50 ms each, plus slack for a busy machine; none stopped before 95 %
    // of its limit (the first of its twenty ticks may come right after it started).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= 4 * Duration::from_micros(47_500),
        "stopped early: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let limits = Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    };
    let policies = engine_with("bad", &hostile("memory-bomb"), limits);
    assert_all_fall_back(
        &policies,
        "exceeded its memory limit of 16777216 bytes",
        DegradedReason::MemoryLimit,
    );
}

#[test]
fn a_call_finds_nothing_an_earlier_call_left_in_its_memory() {
    // Instance slots are reused and reset in place; a reset that missed a page would show here.
    let policies = engine_with("remembers", &hostile("remember"), Limits::default());
    for _ in 0..50 {
        let outcome = policies.pool_sizing(Some("remembers"), &pool(7, 5, 0));
        assert_eq!(outcome.degraded, None);
        assert_eq!(
            outcome.decision.reason,
            "earlier calls 0, grown page held 0x0"
        );
    }
}

#[test]
fn a_panicking_policy_traps() {
    let policies = engine_with("bad", &hostile("trap"), Limits::default());
    assert_all_fall_back(&policies, "trapped", DegradedReason::Trap);
}

#[test]
fn runaway_recursion_is_stopped() {
    let policies = engine_with("bad", &hostile("stack-overflow"), Limits::default());
    let outcome = policies.pool_sizing(Some("bad"), &pool(7, 5, 0));
    assert_eq!(outcome.decision.desired_total, 7);
    let reason = outcome.degraded.expect("degraded");
    assert!(
        reason.contains("overflowed its stack") || reason.contains("trapped"),
        "{reason}"
    );
}

#[test]
fn a_policy_calling_wasi_traps_on_the_import() {
    let policies = engine_with("bad", &hostile("wasi"), Limits::default());
    assert_all_fall_back(&policies, "unknown import", DegradedReason::Trap);
}

#[test]
fn garbage_output_is_rejected() {
    let policies = engine_with("bad", &hostile("garbage"), Limits::default());
    assert_all_fall_back(
        &policies,
        "returned an invalid decision",
        DegradedReason::InvalidOutput,
    );
}

#[test]
fn a_policy_of_the_wrong_world_falls_back() {
    let policies = engine_with("bad", &input("default-expiry", "{}"), Limits::default());
    let p = pool(7, 5, 0);
    let outcome = policies.pool_sizing(Some("bad"), &p);
    assert_eq!(outcome.decision, checks::fallback_sizing(&p));
    assert!(
        outcome
            .degraded
            .expect("degraded")
            .contains("does not implement the pool-sizing-policy world")
    );
    assert_eq!(
        policies
            .metrics()
            .degraded_count(Decision::PoolSizing, DegradedReason::WrongWorld),
        1
    );
    // The world it does implement works.
    assert_eq!(
        policies.expiry(Some("bad"), &expiring(5, vec![])),
        Outcome::ok(ExpiryDecision::Keep {
            recheck_after_ms: Some(5)
        })
    );
}

#[test]
fn garbage_bytes_and_core_modules_do_not_load() {
    let policies = shared();
    let garbage = PolicyInput {
        wasm: b"not wasm at all".to_vec(),
        ..Default::default()
    };
    assert!(matches!(
        policies.load("garbage-bytes", Source::Directory, "test", &garbage),
        Err(LoadError::Compile(_))
    ));
    // A core module (the smallest valid one) is not a component.
    let core = PolicyInput {
        wasm: b"\0asm\x01\0\0\0".to_vec(),
        ..Default::default()
    };
    assert!(matches!(
        policies.load("core-module", Source::Directory, "test", &core),
        Err(LoadError::Compile(_))
    ));
}

#[test]
fn a_policy_that_hangs_while_loading_fails_to_load_in_bounded_time() {
    // The engine (compiling the embedded defaults) starts outside the measured time.
    let policies = shared();
    let started = Instant::now();
    let result = policies.load(
        "hangs-on-load",
        Source::Directory,
        "test",
        &hostile("loop-on-load"),
    );
    assert!(
        matches!(
            result,
            Err(LoadError::Settings {
                error: CallError::OutOfFuel(_),
                ..
            })
        ),
        "unexpected {result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_selected_but_unloaded_policy_uses_the_default_and_says_so() {
    let policies = WasmPolicies::new(Limits::default()).expect("defaults load");
    let p = pool(3, 3, 0);
    let outcome = policies.pool_sizing(Some("nonexistent"), &p);
    assert_eq!(
        outcome.decision,
        NativePolicies.pool_sizing(None, &p).decision
    );
    assert_eq!(
        outcome.degraded.as_deref(),
        Some("policy \"nonexistent\" not loaded; used the default")
    );
    assert_eq!(
        policies
            .metrics()
            .degraded_count(Decision::PoolSizing, DegradedReason::NotLoaded),
        1
    );
    assert!(!policies.is_known("nonexistent"));
}

#[test]
fn settings_are_validated_on_load() {
    let policies = WasmPolicies::new(Limits::default()).expect("defaults load");
    let refused = policies.load(
        "bad-settings",
        Source::Directory,
        "test",
        &hostile("bad-settings"),
    );
    assert!(
        matches!(refused, Err(LoadError::Settings { .. })),
        "{refused:?}"
    );
    let not_json = policies.load(
        "not-json",
        Source::Directory,
        "test",
        &input("demand-aware-sizing", "{oops"),
    );
    assert!(
        matches!(not_json, Err(LoadError::SettingsNotJson(_))),
        "{not_json:?}"
    );
    // Known (so admission accepts the name) but degraded, with the load error in the reason.
    assert!(policies.is_known("bad-settings"));
    let outcome = policies.pool_sizing(Some("bad-settings"), &pool(3, 3, 0));
    assert!(
        outcome
            .degraded
            .expect("degraded")
            .contains("refuses its settings")
    );
}

#[test]
fn a_pinned_digest_must_match() {
    let policies = WasmPolicies::new(Limits::default()).expect("defaults load");
    let mut pinned = input("demand-aware-sizing", "{}");
    pinned.pinned_sha256 = Some("0".repeat(64));
    assert!(matches!(
        policies.load("pinned", Source::ConfigMap, "test", &pinned),
        Err(LoadError::DigestMismatch { .. })
    ));
    pinned.pinned_sha256 = Some(format!(
        "sha256:{}",
        super::host::digest(&pinned.wasm).to_uppercase()
    ));
    assert!(
        policies
            .load("pinned", Source::ConfigMap, "test", &pinned)
            .is_ok()
    );
}

#[test]
fn a_failed_reload_keeps_the_last_good_revision() {
    let policies = WasmPolicies::new(Limits::default()).expect("defaults load");
    let good = input("demand-aware-sizing", r#"{"minExtra": 5}"#);
    let digest = policies
        .load("demand", Source::Directory, "test", &good)
        .expect("loads")
        .expect("new revision");
    assert_eq!(
        policies.load("demand", Source::Directory, "test", &good),
        Ok(None),
        "an unchanged input is not reloaded"
    );
    let p = pool(3, 3, 0);
    let widened = policies.pool_sizing(Some("demand"), &p);
    assert_eq!(widened.degraded, None);
    assert_eq!(widened.decision.desired_total, 3 + 2 + 5);

    let broken = PolicyInput {
        wasm: b"broken".to_vec(),
        ..Default::default()
    };
    assert!(
        policies
            .load("demand", Source::Directory, "test", &broken)
            .is_err()
    );
    let stale = policies.pool_sizing(Some("demand"), &p);
    assert_eq!(
        stale.decision.desired_total, 10,
        "the last good revision still decides"
    );
    let reason = stale.degraded.expect("degraded");
    assert!(
        reason.contains("latest revision failed to load") && reason.contains(&digest[..12]),
        "{reason}"
    );
    assert_eq!(
        policies
            .metrics()
            .degraded_count(Decision::PoolSizing, DegradedReason::StaleRevision),
        1
    );

    assert!(policies.unload("demand", Source::Directory));
    assert!(!policies.is_known("demand"));
}

#[test]
fn a_config_map_policy_wins_over_a_directory_one_of_the_same_name() {
    let policies = WasmPolicies::new(Limits::default()).expect("defaults load");
    policies
        .load(
            "same",
            Source::Directory,
            "dir",
            &input("demand-aware-sizing", r#"{"minExtra": 1}"#),
        )
        .expect("loads");
    policies
        .load(
            "same",
            Source::ConfigMap,
            "cm",
            &input("demand-aware-sizing", r#"{"minExtra": 7}"#),
        )
        .expect("loads");
    assert_eq!(
        policies
            .pool_sizing(Some("same"), &pool(0, 0, 0))
            .decision
            .desired_total,
        9
    );
    policies.unload("same", Source::ConfigMap);
    assert_eq!(
        policies
            .pool_sizing(Some("same"), &pool(0, 0, 0))
            .decision
            .desired_total,
        3
    );
}

#[test]
fn components_are_compiled_once_per_digest() {
    let policies = shared();
    let wasm = built("expiry-grace");
    let first = policies.host().compile(&wasm).expect("compiles");
    let second = policies.host().compile(&wasm).expect("compiles");
    assert!(Arc::ptr_eq(&first, &second));
}

// ---- the examples ----

#[test]
fn demand_aware_sizing_widens_the_buffer_with_recent_allocations() {
    let policies = WasmPolicies::new(Limits::default()).expect("defaults load");
    policies
        .load(
            "demand",
            Source::Directory,
            "test",
            &input("demand-aware-sizing", r#"{"windowSeconds": 60}"#),
        )
        .expect("loads");
    let mut p = pool(10, 10, 0);
    let quiet = policies.pool_sizing(Some("demand"), &p);
    assert_eq!(
        quiet.decision.desired_total,
        NativePolicies.pool_sizing(None, &p).decision.desired_total
    );
    // 6 pods claimed within the window: buffer [2, 4] widens to [8, 8].
    p.recent_allocations = vec![
        AllocationEvent {
            at_unix_ms: p.now_unix_ms - 120_000,
            count: 50,
        },
        AllocationEvent {
            at_unix_ms: p.now_unix_ms - 30_000,
            count: 4,
        },
        AllocationEvent {
            at_unix_ms: p.now_unix_ms - 1_000,
            count: 2,
        },
    ];
    let busy = policies.pool_sizing(Some("demand"), &p);
    assert_eq!(busy.degraded, None);
    assert_eq!(
        busy.decision.desired_total,
        10 + 8,
        "{}",
        busy.decision.reason
    );
    assert!(
        busy.decision
            .reason
            .contains("6 pod(s) claimed in the last 60s"),
        "{}",
        busy.decision.reason
    );
}

#[test]
fn expiry_grace_keeps_batches_with_running_tasks_for_the_grace_period() {
    let policies = WasmPolicies::new(Limits::default()).expect("defaults load");
    let settings = r#"{"graceSeconds": 60, "recheckSeconds": 10, "action": "return-to-pool"}"#;
    policies
        .load(
            "grace",
            Source::Directory,
            "test",
            &input("expiry-grace", settings),
        )
        .expect("loads");
    let decide = |b: &BatchSnapshot| policies.expiry(Some("grace"), b);
    assert_eq!(
        decide(&expiring(5_000, vec![TaskPhase::Running])).decision,
        ExpiryDecision::Keep {
            recheck_after_ms: Some(5_000)
        }
    );
    assert_eq!(
        decide(&expiring(
            -1_000,
            vec![TaskPhase::Succeeded, TaskPhase::Running]
        ))
        .decision,
        ExpiryDecision::Keep {
            recheck_after_ms: Some(10_000)
        }
    );
    assert_eq!(
        decide(&expiring(-55_000, vec![TaskPhase::Running])).decision,
        ExpiryDecision::Keep {
            recheck_after_ms: Some(5_000)
        }
    );
    let done = ExpiryDecision::Expire {
        action: ExpireAction::ReturnToPool,
    };
    assert_eq!(
        decide(&expiring(-60_000, vec![TaskPhase::Running])).decision,
        done
    );
    assert_eq!(
        decide(&expiring(-1_000, vec![TaskPhase::Succeeded])).decision,
        done
    );
}

// ---- loading from a directory and ConfigMaps ----

#[test]
fn a_directory_sync_loads_changes_and_removals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = WasmPolicies::new(Limits::default()).expect("defaults load");
    std::fs::write(dir.path().join("demand.wasm"), built("demand-aware-sizing")).expect("write");
    std::fs::write(dir.path().join("demand.json"), r#"{"minExtra": 2}"#).expect("write");
    std::fs::write(dir.path().join("README.txt"), "not a policy").expect("write");
    registry::sync_dir(&policies, dir.path());
    assert!(policies.is_known("demand"));
    assert_eq!(
        policies
            .pool_sizing(Some("demand"), &pool(0, 0, 0))
            .decision
            .desired_total,
        4
    );

    std::fs::write(dir.path().join("demand.json"), r#"{"minExtra": 6}"#).expect("write");
    registry::sync_dir(&policies, dir.path());
    assert_eq!(
        policies
            .pool_sizing(Some("demand"), &pool(0, 0, 0))
            .decision
            .desired_total,
        8
    );

    std::fs::write(dir.path().join("demand.sha256"), "ab".repeat(32)).expect("write");
    registry::sync_dir(&policies, dir.path());
    let pinned_wrong = policies.pool_sizing(Some("demand"), &pool(0, 0, 0));
    assert_eq!(
        pinned_wrong.decision.desired_total, 8,
        "last good revision keeps serving"
    );
    assert!(
        pinned_wrong
            .degraded
            .expect("degraded")
            .contains("is pinned")
    );

    std::fs::remove_file(dir.path().join("demand.wasm")).expect("remove");
    registry::sync_dir(&policies, dir.path());
    assert!(!policies.is_known("demand"));
    // A vanished directory changes nothing.
    std::fs::write(dir.path().join("kept.wasm"), built("default-pool-sizing")).expect("write");
    registry::sync_dir(&policies, dir.path());
    let before = format!("{:?}", policies.status());
    assert!(policies.is_known("kept"));
    registry::sync_dir(&policies, &dir.path().join("missing"));
    assert_eq!(format!("{:?}", policies.status()), before);
    assert!(policies.is_known("kept"));
}

#[tokio::test]
async fn the_registry_hot_reloads_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("first.wasm"), built("default-pool-sizing")).expect("write");
    let config = RegistryConfig {
        dir: Some(dir.path().to_path_buf()),
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let policies = PolicyRegistry::start(None, config).await.expect("starts");
    assert!(
        policies.is_known("first"),
        "the first pass completes before start returns"
    );

    let mut changes = policies.changes().expect("the wasm engine reports changes");
    std::fs::write(dir.path().join("second.wasm"), built("expiry-grace")).expect("write");
    // Each load ticks the change channel; the poll picks the new file up within a few ticks.
    tokio::time::timeout(Duration::from_secs(30), async {
        while !policies.is_known("second") {
            changes.changed().await.expect("the engine is alive");
        }
    })
    .await
    .expect("second.wasm was never loaded");
    let mut registry = prometheus_client::registry::Registry::default();
    policies.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoding");
    assert!(
        text.contains("sandbox_policy_loads_total{result=\"ok\"} 2"),
        "{text}"
    );
}

#[test]
fn a_config_map_yields_its_component_settings_and_pin() {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("demand".into());
    assert!(matches!(
        registry::config_map_input(&cm),
        Err(LoadError::Read { .. })
    ));
    cm.binary_data = Some([("policy.wasm".to_string(), ByteString(vec![1, 2, 3]))].into());
    cm.data = Some([("settings.json".to_string(), "{}".to_string())].into());
    cm.metadata.annotations = Some(
        [(
            "policy.sandbox.opensandbox.io/sha256".to_string(),
            "abc".to_string(),
        )]
        .into(),
    );
    let input = registry::config_map_input(&cm).expect("a policy ConfigMap");
    assert_eq!(
        (
            input.wasm,
            input.settings.as_deref(),
            input.pinned_sha256.as_deref()
        ),
        (vec![1, 2, 3], Some("{}"), Some("abc"))
    );
}
