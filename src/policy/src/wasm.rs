//! [`WasmPolicies`]: the [`PolicyEngine`] that runs every decision in WebAssembly, through the
//! embedded default policies or a custom one an object selected by name.
//!
//! Custom policies are held per name and source. A source's latest good revision keeps serving
//! while a newer one fails to load; every decision made without the policy the object asked for
//! (not loaded, stale, failed, invalid answer) carries a `degraded` reason and is counted.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use tracing::{info, warn};

use sandbox_decisions::expiry::{BatchSnapshot, ExpiryDecision};
use sandbox_decisions::selection::{SelectionDecision, SelectionInput};
use sandbox_decisions::sizing::{PoolSnapshot, SizingDecision};

use crate::embedded;
use crate::host::{CallClass, CallError, CompiledPolicy, HostError, Limits, LoadError, WasmHost};
use crate::kind::{DecisionKind, Expiry, PoolSelection, PoolSizing, ShardTasksKind};
use crate::metrics::{DegradedReason, PolicyMetrics};
use crate::{
    Decision, Outcome, PerDecision, PolicyEngine, PolicySelector, ShardTaskInput, ShardTasks,
};

/// Settings passed to a policy that was given none.
pub const DEFAULT_SETTINGS: &str = "{}";

/// Where a custom policy came from. When a name exists in both, the ConfigMap wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    ConfigMap,
    Directory,
}

/// One loaded revision of a policy.
#[derive(Clone, Debug)]
pub struct Revision {
    pub policy: Arc<CompiledPolicy>,
    pub settings: String,
    /// Where it was read from, for messages (`ConfigMap ns/name`, a file path).
    pub origin: String,
}

/// What a load is given; its digest tells whether anything changed since the last attempt.
#[derive(Clone, Debug, Default)]
pub struct PolicyInput {
    pub wasm: Vec<u8>,
    pub settings: Option<String>,
    /// The sha256 (hex) the component must have, if pinned.
    pub pinned_sha256: Option<String>,
}

impl PolicyInput {
    fn digest(&self) -> String {
        let mut bytes = self.wasm.clone();
        for part in [self.settings.as_deref(), self.pinned_sha256.as_deref()] {
            bytes.push(0);
            bytes.extend_from_slice(part.unwrap_or("\u{0}none").as_bytes());
        }
        crate::host::digest(&bytes)
    }
}

#[derive(Clone, Debug, Default)]
struct Entry {
    good: Option<Revision>,
    /// The latest load's error, if it failed.
    error: Option<String>,
    /// Digest of the latest input tried, good or not.
    input: Option<String>,
}

/// A custom policy's state, for logs and the CLI.
#[derive(Clone, Debug)]
pub struct PolicyStatus {
    pub name: String,
    pub source: Source,
    pub origin: Option<String>,
    pub digest: Option<String>,
    pub decisions: Vec<Decision>,
    pub error: Option<String>,
}

/// The policy chosen for one decision, and a note when it is not the one asked for.
struct Chosen {
    policy: Arc<CompiledPolicy>,
    settings: String,
    label: String,
    note: Option<(DegradedReason, String)>,
}

/// Custom policies by name, then by where they came from.
type CustomPolicies = BTreeMap<String, BTreeMap<Source, Entry>>;

/// The entry of `name` from `source`, made empty if there is none yet.
fn entry_mut<'a>(custom: &'a mut CustomPolicies, name: &str, source: Source) -> &'a mut Entry {
    custom
        .entry(name.to_string())
        .or_default()
        .entry(source)
        .or_default()
}

/// Runs decisions in WebAssembly. Shared by all reconcilers; every method takes `&self`.
pub struct WasmPolicies {
    host: WasmHost,
    defaults: PerDecision<Arc<CompiledPolicy>>,
    custom: RwLock<CustomPolicies>,
    metrics: PolicyMetrics,
    /// Counts changes to the custom policies; see [`PolicyEngine::changes`].
    changes: tokio::sync::watch::Sender<u64>,
}

/// The embedded defaults failed to compile: the binary itself is broken.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("the embedded default {decision} policy does not load: {error}")]
    Default {
        decision: Decision,
        error: LoadError,
    },
}

impl WasmPolicies {
    /// A host with `limits` and the embedded defaults compiled.
    pub fn new(limits: Limits) -> Result<Self, StartError> {
        let host = WasmHost::new(limits)?;
        let compile = |decision: Decision| {
            let policy = host
                .compile(embedded::default_component(decision))
                .map_err(|error| StartError::Default { decision, error })?;
            if policy.implements(decision) {
                Ok(policy)
            } else {
                let error = LoadError::NoPolicyWorld(vec![
                    policy.why_not(decision).unwrap_or_default().to_string(),
                ]);
                Err(StartError::Default { decision, error })
            }
        };
        let defaults = PerDecision::try_from_fn(compile)?;
        Ok(Self {
            host,
            defaults,
            custom: RwLock::new(BTreeMap::new()),
            metrics: PolicyMetrics::default(),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    fn read_custom(&self) -> std::sync::RwLockReadGuard<'_, CustomPolicies> {
        self.custom
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_custom(&self) -> std::sync::RwLockWriteGuard<'_, CustomPolicies> {
        self.custom
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn host(&self) -> &WasmHost {
        &self.host
    }

    pub fn metrics(&self) -> &PolicyMetrics {
        &self.metrics
    }

    /// The embedded default policy for `decision`.
    pub fn default_policy(&self, decision: Decision) -> &Arc<CompiledPolicy> {
        &self.defaults[decision]
    }

    /// Loads a revision of `name` from `source`. On failure the previous good revision (if any)
    /// keeps serving and the error is reported with every decision that selects `name`.
    /// Returns `Ok(None)` when the input is the one already tried.
    pub fn load(
        &self,
        name: &str,
        source: Source,
        origin: &str,
        input: &PolicyInput,
    ) -> Result<Option<String>, LoadError> {
        let input_digest = input.digest();
        if self.entry(name, source).and_then(|e| e.input).as_deref() == Some(input_digest.as_str())
        {
            return Ok(None);
        }
        let result = self.compile_revision(input, origin);
        let mut custom = self.write_custom();
        let entry = entry_mut(&mut custom, name, source);
        entry.input = Some(input_digest);
        self.metrics.loaded(result.is_ok());
        self.changed();
        match result {
            Ok(revision) => {
                let digest = revision.policy.digest.clone();
                info!(policy = name, ?source, origin, sha256 = %digest, decisions = ?revision.policy.decisions(), "policy loaded");
                entry.good = Some(revision);
                entry.error = None;
                Ok(Some(digest))
            }
            Err(error) => {
                let keeping = entry.good.as_ref().map(|r| r.policy.digest.clone());
                warn!(policy = name, ?source, origin, %error, last_good = ?keeping, "policy failed to load");
                entry.error = Some(format!("{origin}: {error}"));
                Err(error)
            }
        }
    }

    /// Records that `name` could not even be read (so there is no input to load).
    /// Repeats of the same error (a directory poll) are recorded once.
    pub fn record_load_error(&self, name: &str, source: Source, origin: &str, error: &LoadError) {
        let mut custom = self.write_custom();
        let entry = entry_mut(&mut custom, name, source);
        let message = format!("{origin}: {error}");
        if entry.input.is_none() && entry.error.as_deref() == Some(message.as_str()) {
            return;
        }
        warn!(policy = name, ?source, origin, %error, "policy failed to load");
        self.metrics.loaded(false);
        entry.error = Some(message);
        entry.input = None;
        self.changed();
    }

    fn compile_revision(&self, input: &PolicyInput, origin: &str) -> Result<Revision, LoadError> {
        let actual = crate::host::digest(&input.wasm);
        if let Some(expected) = input.pinned_sha256.as_deref().map(str::trim) {
            let expected = expected
                .strip_prefix("sha256:")
                .unwrap_or(expected)
                .to_ascii_lowercase();
            if expected != actual {
                return Err(LoadError::DigestMismatch { expected, actual });
            }
        }
        let settings = input
            .settings
            .clone()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_SETTINGS.into());
        serde_json::from_str::<serde_json::Value>(&settings)
            .map_err(|e| LoadError::SettingsNotJson(e.to_string()))?;
        let policy = self.host.compile(&input.wasm)?;
        for decision in policy.decisions() {
            self.host
                .validate_settings(&policy, decision, &settings)
                .map_err(|error| LoadError::Settings { decision, error })?;
        }
        Ok(Revision {
            policy,
            settings,
            origin: origin.to_string(),
        })
    }

    /// Forgets `name` from `source` (its ConfigMap or file is gone). Returns whether it was there.
    pub fn unload(&self, name: &str, source: Source) -> bool {
        let mut custom = self.write_custom();
        let Some(sources) = custom.get_mut(name) else {
            return false;
        };
        let removed = sources.remove(&source).is_some();
        if sources.is_empty() {
            custom.remove(name);
        }
        if removed {
            info!(policy = name, ?source, "policy unloaded");
            self.changed();
        }
        removed
    }

    /// Names loaded (or failing to load) from `source`.
    pub fn names(&self, source: Source) -> Vec<String> {
        let custom = self.read_custom();
        custom
            .iter()
            .filter(|(_, sources)| sources.contains_key(&source))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether a custom policy of this name exists in any source, loaded or failing to load. The
    /// admission webhook rejects selectors of unknown names; a known but broken policy is accepted
    /// and reported through the object's `PolicyDegraded` condition instead.
    pub fn is_known(&self, name: &str) -> bool {
        let custom = self.read_custom();
        custom.contains_key(name)
    }

    pub fn status(&self) -> Vec<PolicyStatus> {
        let custom = self.read_custom();
        custom
            .iter()
            .flat_map(|(name, sources)| {
                sources.iter().map(move |(source, e)| PolicyStatus {
                    name: name.clone(),
                    source: *source,
                    origin: e.good.as_ref().map(|r| r.origin.clone()),
                    digest: e.good.as_ref().map(|r| r.policy.digest.clone()),
                    decisions: e
                        .good
                        .as_ref()
                        .map(|r| r.policy.decisions())
                        .unwrap_or_default(),
                    error: e.error.clone(),
                })
            })
            .collect()
    }

    fn entry(&self, name: &str, source: Source) -> Option<Entry> {
        let custom = self.read_custom();
        custom
            .get(name)
            .and_then(|sources| sources.get(&source))
            .cloned()
    }

    fn choose(&self, decision: Decision, selector: PolicySelector<'_>) -> Chosen {
        let default = || Chosen {
            policy: self.default_policy(decision).clone(),
            settings: DEFAULT_SETTINGS.into(),
            label: format!("the default {decision} policy"),
            note: None,
        };
        let Some(name) = selector else {
            return default();
        };
        let custom = self.read_custom();
        // The first source that has the name decides, ConfigMaps before the directory.
        let Some(entry) = custom.get(name).and_then(|sources| sources.values().next()) else {
            return Chosen {
                note: Some((
                    DegradedReason::NotLoaded,
                    format!("policy {name:?} not loaded; used the default"),
                )),
                ..default()
            };
        };
        match (&entry.good, &entry.error) {
            (Some(good), error) => Chosen {
                policy: good.policy.clone(),
                settings: good.settings.clone(),
                label: format!("policy {name:?}"),
                note: error.as_ref().map(|e| {
                    let short = &good.policy.digest[..12];
                    (DegradedReason::StaleRevision, format!("policy {name:?}: latest revision failed to load ({e}); used the last good revision sha256:{short}"))
                }),
            },
            (None, error) => {
                let why = error.as_deref().unwrap_or("no revision yet");
                Chosen { note: Some((DegradedReason::NotLoaded, format!("policy {name:?} not loaded ({why}); used the default"))), ..default() }
            }
        }
    }

    /// Runs one decision: the chosen policy, its answer checked, the fallback on any failure.
    pub fn decide<K: DecisionKind>(
        &self,
        selector: PolicySelector<'_>,
        input: &K::Input,
    ) -> Outcome<K::Output> {
        let decision = K::DECISION;
        self.metrics.decided(decision);
        let chosen = self.choose(decision, selector);
        let class = if Arc::ptr_eq(&chosen.policy, self.default_policy(decision)) {
            CallClass::Default
        } else {
            CallClass::Custom
        };
        let result = self
            .host
            .decide::<K>(&chosen.policy, class, &chosen.settings, input)
            .and_then(|answer| match K::check(input, &answer) {
                Ok(()) => Ok(answer),
                Err(why) => Err(CallError::InvalidOutput(why)),
            });
        match (result, chosen.note) {
            (Ok(answer), None) => Outcome::ok(answer),
            (Ok(answer), Some((reason, note))) => {
                self.metrics.degraded(decision, reason);
                Outcome {
                    decision: answer,
                    degraded: Some(note),
                }
            }
            (Err(error), note) => {
                self.metrics.degraded(decision, error.reason());
                let (answer, what) = K::fallback(input);
                let failed = format!("{} ({decision}) {error}; {what}", chosen.label);
                warn!(%decision, policy = ?selector, %error, fallback = what, "policy failed; used the fail-safe decision");
                let reason = match note {
                    Some((_, note)) => format!("{note}; {failed}"),
                    None => failed,
                };
                Outcome {
                    decision: answer,
                    degraded: Some(reason),
                }
            }
        }
    }
}

impl PolicyEngine for WasmPolicies {
    fn pool_sizing(
        &self,
        selector: PolicySelector<'_>,
        pool: &PoolSnapshot,
    ) -> Outcome<SizingDecision> {
        self.decide::<PoolSizing>(selector, pool)
    }

    fn shard_tasks(
        &self,
        selector: PolicySelector<'_>,
        batch: &ShardTaskInput,
    ) -> Outcome<Option<ShardTasks>> {
        self.decide::<ShardTasksKind>(selector, batch)
    }

    fn expiry(
        &self,
        selector: PolicySelector<'_>,
        batch: &BatchSnapshot,
    ) -> Outcome<ExpiryDecision> {
        self.decide::<Expiry>(selector, batch)
    }

    fn pool_selection(
        &self,
        selector: PolicySelector<'_>,
        input: &SelectionInput,
    ) -> Outcome<SelectionDecision> {
        self.decide::<PoolSelection>(selector, input)
    }

    fn is_known(&self, name: &str) -> bool {
        WasmPolicies::is_known(self, name)
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}
