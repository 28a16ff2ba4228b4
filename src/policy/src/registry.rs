//! Loads custom policies at runtime and keeps them current without a restart:
//! - from a directory: `<name>.wasm`, optional `<name>.json` (settings) and `<name>.sha256` (pin),
//!   polled for changes;
//! - from ConfigMaps labelled `policy.sandbox.opensandbox.io/policy=true` in one namespace,
//!   watched: binaryData `policy.wasm`, optional data `settings.json`, optional annotation
//!   `policy.sandbox.opensandbox.io/sha256`.
//!
//! Nothing here can stop the controller: a policy that fails to load is reported and its last good
//! revision (or the default) keeps serving.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, warn};

use crate::host::{HostError, Limits, LoadError};
use crate::wasm::{PolicyInput, Source, StartError, WasmPolicies};

/// Where custom policies come from.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Namespace whose labelled ConfigMaps hold policies (`None`: ConfigMaps are not watched).
    pub namespace: Option<String>,
    /// Directory of `<name>.wasm` files (`None`: no directory).
    pub dir: Option<PathBuf>,
    /// How often the directory is checked for changes.
    pub poll_interval: Duration,
    pub limits: Limits,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            dir: None,
            poll_interval: Duration::from_secs(2),
            limits: Limits::default(),
        }
    }
}

/// Starts the policy engine and its loaders.
pub struct PolicyRegistry;

impl PolicyRegistry {
    /// Compiles the embedded defaults, loads the directory once, then keeps the directory and
    /// (given a client and a namespace) the policy ConfigMaps in sync from background tasks on the
    /// current tokio runtime. Fails only if the embedded defaults do not load.
    pub async fn start(
        client: Option<Client>,
        config: RegistryConfig,
    ) -> Result<Arc<WasmPolicies>, StartError> {
        let limits = config.limits;
        let policies = tokio::task::spawn_blocking(move || WasmPolicies::new(limits))
            .await
            .map_err(|e| StartError::Host(HostError::from_join(e)))??;
        let policies = Arc::new(policies);
        if let Some(dir) = config.dir.clone() {
            let first = policies.clone();
            let first_dir = dir.clone();
            // The first pass completes before start returns, so objects never see a policy
            // "not loaded" merely because the controller has just started.
            let _ = tokio::task::spawn_blocking(move || sync_dir(&first, &first_dir)).await;
            tokio::spawn(poll_dir(policies.clone(), dir, config.poll_interval));
        }
        if let (Some(client), Some(namespace)) = (client, config.namespace) {
            tokio::spawn(watch_config_maps(policies.clone(), client, namespace));
        }
        Ok(policies)
    }
}

async fn poll_dir(policies: Arc<WasmPolicies>, dir: PathBuf, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (p, d) = (policies.clone(), dir.clone());
        if let Err(error) = tokio::task::spawn_blocking(move || sync_dir(&p, &d)).await {
            warn!(%error, "policy directory sync panicked; retrying on the next tick");
        }
    }
}

/// Brings the directory's policies in line with its files. An unreadable directory changes
/// nothing, so a transient error never unloads every policy.
pub fn sync_dir(policies: &WasmPolicies, dir: &Path) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            warn!(dir = %dir.display(), %error, "cannot read the policy directory; keeping the loaded policies");
            return;
        }
    };
    let mut present = BTreeSet::new();
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
            continue;
        }
        let Some(name) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        present.insert(name.clone());
        let origin = path.display().to_string();
        match read_dir_input(&path) {
            // Ok(None): unchanged since the last attempt; errors are recorded by `load` itself.
            Ok(input) => {
                let _ = policies.load(&name, Source::Directory, &origin, &input);
            }
            Err(error) => policies.record_load_error(&name, Source::Directory, &origin, &error),
        }
    }
    for name in policies.names(Source::Directory) {
        if !present.contains(&name) {
            policies.unload(&name, Source::Directory);
        }
    }
}

fn read_dir_input(wasm_path: &Path) -> Result<PolicyInput, LoadError> {
    let read_error = |path: &Path, error: std::io::Error| LoadError::Read {
        path: path.display().to_string(),
        error: error.to_string(),
    };
    let wasm = std::fs::read(wasm_path).map_err(|e| read_error(wasm_path, e))?;
    let optional = |extension: &str| -> Result<Option<String>, LoadError> {
        let path = wasm_path.with_extension(extension);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_error(&path, e)),
        }
    };
    Ok(PolicyInput {
        wasm,
        settings: optional("json")?,
        pinned_sha256: optional("sha256")?,
    })
}

async fn watch_config_maps(policies: Arc<WasmPolicies>, client: Client, namespace: String) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{}=true", crate::names::LABEL_POLICY));
    let mut events = watcher(api, config).default_backoff().boxed();
    // Names seen during a (re)list, so ConfigMaps deleted while the watch was down are unloaded.
    let mut relisted = BTreeSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(cm)) => {
                relisted.insert(cm.name_any());
                load_config_map(&policies, &namespace, cm).await;
            }
            Ok(watcher::Event::InitDone) => {
                for name in policies.names(Source::ConfigMap) {
                    if !relisted.contains(&name) {
                        policies.unload(&name, Source::ConfigMap);
                    }
                }
            }
            Ok(watcher::Event::Apply(cm)) => load_config_map(&policies, &namespace, cm).await,
            Ok(watcher::Event::Delete(cm)) => {
                policies.unload(&cm.name_any(), Source::ConfigMap);
            }
            Err(error) => warn!(%namespace, %error, "watching policy ConfigMaps failed; retrying"),
        }
    }
}

async fn load_config_map(policies: &Arc<WasmPolicies>, namespace: &str, cm: ConfigMap) {
    let name = cm.name_any();
    let origin = format!("ConfigMap {namespace}/{name}");
    let input = config_map_input(&cm);
    let policies = policies.clone();
    let loaded = tokio::task::spawn_blocking(move || match input {
        Ok(input) => policies
            .load(&name, Source::ConfigMap, &origin, &input)
            .map(drop),
        Err(error) => {
            policies.record_load_error(&name, Source::ConfigMap, &origin, &error);
            Err(error)
        }
    })
    .await;
    if let Ok(Err(error)) = loaded {
        debug!(%error, "policy ConfigMap load failed (reported with its decisions)");
    }
}

/// The policy a ConfigMap holds.
pub fn config_map_input(cm: &ConfigMap) -> Result<PolicyInput, LoadError> {
    let wasm = cm
        .binary_data
        .as_ref()
        .and_then(|data| data.get(crate::names::POLICY_CONFIGMAP_WASM_KEY))
        .map(|bytes| bytes.0.clone())
        .ok_or_else(|| LoadError::Read {
            path: format!("ConfigMap {}", cm.name_any()),
            error: format!(
                "no binaryData key {:?}",
                crate::names::POLICY_CONFIGMAP_WASM_KEY
            ),
        })?;
    let settings = cm
        .data
        .as_ref()
        .and_then(|data| data.get(crate::names::POLICY_CONFIGMAP_SETTINGS_KEY))
        .cloned();
    let pinned_sha256 = cm
        .annotations()
        .get(crate::names::ANNOTATION_POLICY_SHA256)
        .cloned();
    Ok(PolicyInput {
        wasm,
        settings,
        pinned_sha256,
    })
}
