//! The sandboxed wasmtime host: one [`Engine`], components compiled once per sha256 digest, and a
//! fresh [`Store`] for every call under fuel, wall-clock, memory and stack limits.
//!
//! Guests get no capabilities: every import a component declares (WASI included) is linked to a
//! function that traps, so a policy can compute and nothing else. Calls are synchronous; async
//! callers run them on a blocking thread.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
    Store, Trap,
};

use crate::Decision;
use crate::kind::{DecisionKind, Expiry, GuestResult, PoolSelection, PoolSizing, ShardTasksKind};
use crate::metrics::DegradedReason;

/// What one call may use. Exceeding any limit ends the call with a [`CallError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Units of fuel (about one per WebAssembly instruction) for instantiation plus the call.
    pub fuel: u64,
    /// Wall-clock bound, enforced by epoch interruption in ticks of [`Limits::epoch_tick`].
    pub timeout: Duration,
    /// Largest linear memory, in bytes.
    pub memory_bytes: usize,
    /// Largest WebAssembly call stack, in bytes.
    pub max_wasm_stack: usize,
}

impl Default for Limits {
    /// Generous for any sane decision (the defaults use well under 1% of the fuel on large
    /// inputs), tight enough that a runaway guest is stopped in a fraction of a second.
    fn default() -> Self {
        Self {
            fuel: 100_000_000,
            timeout: Duration::from_secs(1),
            memory_bytes: 64 << 20,
            max_wasm_stack: 512 << 10,
        }
    }
}

/// Ticks per wall-clock limit: a call is stopped between 95 % and 100 % of its limit.
const TICKS_PER_TIMEOUT: u32 = 20;
/// Bounds of the tick. The ticking thread wakes once per tick for as long as the controller
/// runs, so the tick is as coarse as the limit allows (50 ms for the default second: 20 wakeups
/// a second where a fixed 5 ms tick made 200, each one taking a core from a reconcile or a call).
const MIN_EPOCH_TICK: Duration = Duration::from_millis(1);
const MAX_EPOCH_TICK: Duration = Duration::from_millis(50);

impl Limits {
    /// How often the epoch advances for these limits.
    pub fn epoch_tick(&self) -> Duration {
        (self.timeout / TICKS_PER_TIMEOUT).clamp(MIN_EPOCH_TICK, MAX_EPOCH_TICK)
    }

    /// The epoch deadline of one call: the timeout in whole ticks, rounded up.
    fn epoch_deadline(&self) -> u64 {
        let tick = self.epoch_tick().as_micros().max(1);
        u64::try_from(self.timeout.as_micros().div_ceil(tick))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
#[error("configuring the WebAssembly engine failed: {0}")]
pub struct HostError(String);

impl HostError {
    pub(crate) fn from_join(error: tokio::task::JoinError) -> Self {
        Self(format!("the engine start-up thread failed: {error}"))
    }
}

/// Why a component could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("implements none of the policy worlds ({})", .0.join("; "))]
    NoPolicyWorld(Vec<String>),
    #[error("sha256 is {actual} but {expected} is pinned")]
    DigestMismatch { expected: String, actual: String },
    #[error("settings are not valid JSON: {0}")]
    SettingsNotJson(String),
    #[error("{decision} rejected its settings: {error}")]
    Settings {
        decision: Decision,
        error: CallError,
    },
    #[error("reading {path}: {error}")]
    Read { path: String, error: String },
}

/// Why a call produced no usable decision.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("does not implement the {} world", .0.world())]
    WrongWorld(Decision),
    #[error("ran out of fuel ({0} units)")]
    OutOfFuel(u64),
    #[error("exceeded its time limit of {0:?}")]
    Timeout(Duration),
    #[error("exceeded its memory limit of {limit} bytes (asked for {asked})")]
    MemoryLimit { limit: usize, asked: usize },
    #[error("overflowed its stack")]
    StackOverflow,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned an error: {0}")]
    Refused(String),
    #[error("returned an invalid decision: {0}")]
    InvalidOutput(String),
}

impl CallError {
    /// Why a decision that ran into this error is degraded.
    pub fn reason(&self) -> DegradedReason {
        match self {
            CallError::WrongWorld(_) => DegradedReason::WrongWorld,
            CallError::OutOfFuel(_) => DegradedReason::OutOfFuel,
            CallError::Timeout(_) => DegradedReason::Timeout,
            CallError::MemoryLimit { .. } => DegradedReason::MemoryLimit,
            CallError::StackOverflow => DegradedReason::StackOverflow,
            CallError::Trap(_) => DegradedReason::Trap,
            CallError::Refused(_) => DegradedReason::PolicyError,
            CallError::InvalidOutput(_) => DegradedReason::InvalidOutput,
        }
    }
}

/// A compiled component, ready to instantiate for each decision it implements.
pub struct CompiledPolicy {
    /// Hex sha256 of the component's bytes.
    pub digest: String,
    pub size_bytes: usize,
    exports: Exports,
    /// For each decision it does not implement, why not.
    missing: Vec<(Decision, String)>,
}

/// A component's typed pre-instance for each world it implements.
pub struct Exports {
    pub(crate) pool_sizing: Option<<PoolSizing as DecisionKind>::Pre>,
    pub(crate) shard_tasks: Option<<ShardTasksKind as DecisionKind>::Pre>,
    pub(crate) expiry: Option<<Expiry as DecisionKind>::Pre>,
    pub(crate) pool_selection: Option<<PoolSelection as DecisionKind>::Pre>,
}

impl CompiledPolicy {
    pub fn implements(&self, decision: Decision) -> bool {
        crate::with_kind!(decision, |K| K::pre_of(&self.exports).is_some())
    }

    pub fn decisions(&self) -> Vec<Decision> {
        Decision::ALL
            .into_iter()
            .filter(|d| self.implements(*d))
            .collect()
    }

    /// Why the component does not implement `decision`, if it does not.
    pub fn why_not(&self, decision: Decision) -> Option<&str> {
        self.missing
            .iter()
            .find(|(d, _)| *d == decision)
            .map(|(_, why)| why.as_str())
    }
}

impl fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledPolicy")
            .field("digest", &self.digest)
            .field("decisions", &self.decisions())
            .finish()
    }
}

/// The typed pre-instance of `K`'s world, or why the component does not implement it.
fn implemented<K: DecisionKind>(
    pre: &InstancePre<CallState>,
    missing: &mut Vec<(Decision, String)>,
) -> Option<K::Pre> {
    K::pre(pre.clone())
        .map_err(|e| missing.push((K::DECISION, format!("{e:#}"))))
        .ok()
}

/// Hex sha256 of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Per-call store data: just the memory limiter.
pub struct CallState {
    limiter: CallLimiter,
}

/// Counts linear memory across all of an instance's memories: a component may have several.
struct CallLimiter {
    memory_bytes: usize,
    used: usize,
}

/// The error a refused `memory.grow` traps with, so the failure is reported as what it is.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded (asked for {asked} in all)")]
struct MemoryLimitExceeded {
    limit: usize,
    asked: usize,
}

/// Tables and instances are bounded too, far above what a policy needs, so a component cannot
/// exhaust the host with them either.
const MAX_TABLE_ELEMENTS: usize = 100_000;
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 16;

impl ResourceLimiter for CallLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used.saturating_add(desired.saturating_sub(current));
        if total > self.memory_bytes {
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                limit: self.memory_bytes,
                asked: total,
            }));
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Advances the engine's epoch until the host is dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: &Engine, tick: Duration) -> Result<Self, HostError> {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| HostError(format!("starting the epoch thread: {e}")))?;
        Ok(Self { stop })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One engine and its compiled components. Cheap to share: all methods take `&self`.
pub struct WasmHost {
    engine: Engine,
    limits: Limits,
    /// Compiled components by digest; an entry lives as long as some registry revision uses it.
    compiled: Mutex<HashMap<String, Weak<CompiledPolicy>>>,
    /// Calls in flight never exceed what the instance pool holds.
    slots: CallSlots,
    _ticker: EpochTicker,
}

/// Decisions evaluated at once. Instances come from a preallocated pool (reused memory slots make
/// a fresh instance several times cheaper than mapping new memory); a call beyond this waits for
/// a slot rather than failing.
pub const CONCURRENT_CALLS: u32 = 64;

/// Slots of [`CONCURRENT_CALLS`] that only the embedded defaults may take. Their decisions run on
/// the controller's reconciling threads (one call each at a time), and custom policies, any of
/// which may use its whole time limit, must not make those threads wait for a slot.
pub const RESERVED_FOR_DEFAULTS: u32 = 16;

/// Whose policy a call runs, for [`RESERVED_FOR_DEFAULTS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallClass {
    /// An embedded default policy: takes any free slot.
    Default,
    /// A custom policy: leaves the reserved slots free.
    Custom,
}

/// How much of a slot's memory and tables is reset in place instead of handed back to the
/// kernel, where the kernel can tell which pages a call wrote (Linux 6.7+, `PAGEMAP_SCAN`).
/// Without that, keeping memory resident would mean a memset of all of it after every call.
const KEEP_RESIDENT_BYTES: usize = 1 << 20;

/// The instance pool: room for [`CONCURRENT_CALLS`] component instances. Rust guests use 3 or 4
/// core instances, memories and tables each; componentize-py guests (CPython) about 40 core
/// instances. Core instance slots are only counted, while memory and table slots are reserved
/// address space (no resident memory until used).
fn pooling(limits: &Limits, reset_in_place: bool) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(CONCURRENT_CALLS)
        .max_core_instances_per_component(128)
        .total_core_instances(CONCURRENT_CALLS * 64)
        .max_memories_per_component(16)
        .total_memories(CONCURRENT_CALLS * 4)
        .max_tables_per_component(128)
        .total_tables(CONCURRENT_CALLS * 64)
        .table_elements(MAX_TABLE_ELEMENTS)
        .max_memory_size(limits.memory_bytes);
    if reset_in_place {
        pool.linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_BYTES)
            .pagemap_scan(Enabled::Yes);
    }
    pool
}

/// A counting semaphore for [`CONCURRENT_CALLS`], with [`RESERVED_FOR_DEFAULTS`] of them kept
/// from custom policies; callers block their thread while they wait.
struct CallSlots {
    counts: Mutex<SlotCounts>,
    freed: Condvar,
    reserved: u32,
}

struct SlotCounts {
    free: u32,
    /// Callers blocked in [`CallSlots::acquire`]: a freed slot wakes them only if there are any,
    /// as waking no one still costs a system call on every decision.
    waiting: u32,
}

impl CallSlots {
    fn new(count: u32, reserved: u32) -> Self {
        Self {
            counts: Mutex::new(SlotCounts {
                free: count,
                waiting: 0,
            }),
            freed: Condvar::new(),
            reserved: reserved.min(count.saturating_sub(1)),
        }
    }

    fn may_take(&self, free: u32, class: CallClass) -> bool {
        match class {
            CallClass::Default => free > 0,
            CallClass::Custom => free > self.reserved,
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, SlotCounts> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take<'a>(&'a self, counts: &mut SlotCounts) -> CallSlot<'a> {
        counts.free -= 1;
        CallSlot(self)
    }

    fn acquire(&self, class: CallClass) -> CallSlot<'_> {
        let mut counts = self.counts();
        if !self.may_take(counts.free, class) {
            counts.waiting += 1;
            while !self.may_take(counts.free, class) {
                counts = self
                    .freed
                    .wait(counts)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            counts.waiting -= 1;
        }
        self.take(&mut counts)
    }

    #[cfg(test)]
    fn try_acquire(&self, class: CallClass) -> Option<CallSlot<'_>> {
        let mut counts = self.counts();
        self.may_take(counts.free, class)
            .then(|| self.take(&mut counts))
    }

    #[cfg(test)]
    fn waiting(&self) -> u32 {
        self.counts().waiting
    }
}

struct CallSlot<'a>(&'a CallSlots);

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        let someone_waits = {
            let mut counts = self.0.counts();
            counts.free += 1;
            counts.waiting > 0
        };
        // Waiters differ in what they may take: a default may be waiting behind a custom call
        // that cannot use this slot, so all are woken to look.
        if someone_waits {
            self.0.freed.notify_all();
        }
    }
}

impl WasmHost {
    pub fn new(limits: Limits) -> Result<Self, HostError> {
        // `PAGEMAP_SCAN` is asked for outright, so a kernel without it fails the first try.
        let engine = Engine::new(&Self::config(&limits, true))
            .or_else(|_| Engine::new(&Self::config(&limits, false)))
            .map_err(|e| HostError(e.to_string()))?;
        let ticker = EpochTicker::start(&engine, limits.epoch_tick())?;
        Ok(Self {
            engine,
            limits,
            compiled: Mutex::new(HashMap::new()),
            slots: CallSlots::new(CONCURRENT_CALLS, RESERVED_FOR_DEFAULTS),
            _ticker: ticker,
        })
    }

    fn config(limits: &Limits, reset_in_place: bool) -> Config {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(limits.max_wasm_stack)
            // Calls are synchronous; the concurrency machinery would only slow each call down.
            .concurrency_support(false)
            // A slot per memory of at most the memory limit, not the default 4 GiB reservation.
            .memory_reservation(limits.memory_bytes as u64)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(
                limits,
                reset_in_place,
            )));
        config
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Compiles `bytes` (once per digest) and finds which policy worlds it implements.
    pub fn compile(&self, bytes: &[u8]) -> Result<Arc<CompiledPolicy>, LoadError> {
        let digest = digest(bytes);
        if let Some(hit) = self.cached(&digest) {
            return Ok(hit);
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let mut linker = Linker::<CallState>::new(&self.engine);
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;

        let mut missing = Vec::new();
        let exports = Exports {
            pool_sizing: implemented::<PoolSizing>(&pre, &mut missing),
            shard_tasks: implemented::<ShardTasksKind>(&pre, &mut missing),
            expiry: implemented::<Expiry>(&pre, &mut missing),
            pool_selection: implemented::<PoolSelection>(&pre, &mut missing),
        };
        let policy = CompiledPolicy {
            digest: digest.clone(),
            size_bytes: bytes.len(),
            exports,
            missing,
        };
        if policy.decisions().is_empty() {
            let reasons = policy
                .missing
                .iter()
                .map(|(d, why)| format!("{}: {why}", d.world()))
                .collect();
            return Err(LoadError::NoPolicyWorld(reasons));
        }
        let policy = Arc::new(policy);
        let mut compiled = self
            .compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        compiled.retain(|_, weak| weak.strong_count() > 0);
        compiled.insert(digest, Arc::downgrade(&policy));
        Ok(policy)
    }

    fn cached(&self, digest: &str) -> Option<Arc<CompiledPolicy>> {
        let compiled = self
            .compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        compiled.get(digest).and_then(Weak::upgrade)
    }

    /// A store with this host's limits, good for one instantiation and call.
    fn store(&self) -> Store<CallState> {
        let mut store = Store::new(
            &self.engine,
            CallState {
                limiter: CallLimiter {
                    memory_bytes: self.limits.memory_bytes,
                    used: 0,
                },
            },
        );
        store.limiter(|state| &mut state.limiter);
        // Fuel is enabled on the engine, so this cannot fail.
        let _ = store.set_fuel(self.limits.fuel);
        store.set_epoch_deadline(self.limits.epoch_deadline());
        store.epoch_deadline_trap();
        store
    }

    fn classify(&self, error: wasmtime::Error) -> CallError {
        if let Some(m) = error.downcast_ref::<MemoryLimitExceeded>() {
            return CallError::MemoryLimit {
                limit: m.limit,
                asked: m.asked,
            };
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => CallError::OutOfFuel(self.limits.fuel),
            Some(Trap::Interrupt) => CallError::Timeout(self.limits.timeout),
            Some(Trap::StackOverflow) => CallError::StackOverflow,
            Some(trap) => CallError::Trap(trap.to_string()),
            None => CallError::Trap(error.root_cause().to_string()),
        }
    }

    /// Asks the component whether it accepts `settings` for `decision`.
    pub fn validate_settings(
        &self,
        policy: &CompiledPolicy,
        decision: Decision,
        settings: &str,
    ) -> Result<(), CallError> {
        crate::with_kind!(decision, |K| self.run::<K, _>(
            policy,
            CallClass::Custom,
            |pre, store| K::validate_settings(pre, store, settings)
        ))
    }

    /// The policy's raw decision of kind `K` (not yet checked against its input).
    pub fn decide<K: DecisionKind>(
        &self,
        policy: &CompiledPolicy,
        class: CallClass,
        settings: &str,
        input: &K::Input,
    ) -> Result<K::Output, CallError> {
        self.run::<K, _>(policy, class, |pre, store| {
            K::call(pre, store, settings, input)
        })
    }

    /// One call into a fresh instance of `policy`'s `K` world, its failure classified.
    fn run<K: DecisionKind, T>(
        &self,
        policy: &CompiledPolicy,
        class: CallClass,
        call: impl FnOnce(&K::Pre, &mut Store<CallState>) -> GuestResult<T>,
    ) -> Result<T, CallError> {
        let pre = K::pre_of(&policy.exports).ok_or(CallError::WrongWorld(K::DECISION))?;
        // Declared first, so the slot is given back only after the store is dropped.
        let _slot = self.slots.acquire(class);
        let mut store = self.store();
        call(pre, &mut store)
            .map_err(|e| self.classify(e))?
            .map_err(|e| CallError::Refused(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn limits_with_timeout(timeout: Duration) -> Limits {
        Limits {
            timeout,
            ..Limits::default()
        }
    }

    #[test]
    fn the_epoch_ticks_a_twentieth_of_the_timeout_within_its_bounds() {
        let cases = [
            // The default second: 50 ms ticks, twenty of them.
            (Duration::from_secs(1), Duration::from_millis(50), 20),
            (Duration::from_millis(100), Duration::from_millis(5), 20),
            // Short limits tick no faster than every millisecond.
            (Duration::from_millis(5), Duration::from_millis(1), 5),
            (Duration::from_micros(300), Duration::from_millis(1), 1),
            // Long limits tick no slower than every 50 ms.
            (Duration::from_secs(60), Duration::from_millis(50), 1200),
            (Duration::from_millis(1010), Duration::from_millis(50), 21),
        ];
        for (timeout, tick, deadline) in cases {
            let limits = limits_with_timeout(timeout);
            assert_eq!(limits.epoch_tick(), tick, "tick of {timeout:?}");
            assert_eq!(limits.epoch_deadline(), deadline, "ticks of {timeout:?}");
        }
    }

    #[test]
    fn custom_calls_leave_the_reserved_slots_to_the_defaults() {
        let slots = CallSlots::new(4, 2);
        let custom: Vec<_> = (0..2)
            .map(|_| slots.try_acquire(CallClass::Custom))
            .collect();
        assert!(custom.iter().all(Option::is_some));
        assert!(
            slots.try_acquire(CallClass::Custom).is_none(),
            "the last two slots are the defaults'"
        );
        let first = slots.try_acquire(CallClass::Default);
        let second = slots.try_acquire(CallClass::Default);
        assert!(first.is_some() && second.is_some());
        assert!(slots.try_acquire(CallClass::Default).is_none(), "all taken");
        drop(first);
        assert!(
            slots.try_acquire(CallClass::Custom).is_none(),
            "a freed reserved slot stays the defaults'"
        );
        drop(custom);
        assert!(slots.try_acquire(CallClass::Custom).is_some());
    }

    #[test]
    fn a_default_waiting_for_a_slot_gets_one_when_a_call_ends() {
        let slots = Arc::new(CallSlots::new(2, 1));
        let custom = slots.try_acquire(CallClass::Custom);
        assert!(custom.is_some());
        let last = slots.try_acquire(CallClass::Default);
        assert!(last.is_some());
        let (took, taken) = std::sync::mpsc::channel();
        let waiter = {
            let slots = slots.clone();
            std::thread::spawn(move || {
                let _slot = slots.acquire(CallClass::Default);
                took.send(()).expect("the test is listening");
            })
        };
        // The slot is freed only once the waiter is blocked, so that freeing it must wake it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while slots.waiting() == 0 {
            assert!(Instant::now() < deadline, "the waiter never blocked");
            std::thread::yield_now();
        }
        drop(last);
        taken
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiting default got the freed slot");
        waiter.join().expect("the waiter finished");
        assert_eq!(slots.waiting(), 0);
    }
}
