//! The default policies, built from `policies/defaults/` by `build.rs` and embedded in the binary,
//! so a default install needs no files.

use std::path::{Path, PathBuf};

use crate::Decision;

pub const DEFAULT_POOL_SIZING: &[u8] = include_bytes!(concat!(
    env!("SANDBOX_POLICY_WASM_DIR"),
    "/default_pool_sizing.wasm"
));
pub const DEFAULT_SHARD_TASKS: &[u8] = include_bytes!(concat!(
    env!("SANDBOX_POLICY_WASM_DIR"),
    "/default_shard_tasks.wasm"
));
pub const DEFAULT_EXPIRY: &[u8] = include_bytes!(concat!(
    env!("SANDBOX_POLICY_WASM_DIR"),
    "/default_expiry.wasm"
));

pub const DEFAULT_POOL_SELECTION: &[u8] = include_bytes!(concat!(
    env!("SANDBOX_POLICY_WASM_DIR"),
    "/default_pool_selection.wasm"
));

/// The embedded default component for `decision`.
pub fn default_component(decision: Decision) -> &'static [u8] {
    match decision {
        Decision::PoolSizing => DEFAULT_POOL_SIZING,
        Decision::ShardTasks => DEFAULT_SHARD_TASKS,
        Decision::Expiry => DEFAULT_EXPIRY,
        Decision::PoolSelection => DEFAULT_POOL_SELECTION,
    }
}

/// Where the build left every guest it built (defaults, examples and test guests), e.g.
/// `demand_aware_sizing.wasm`. Exists only on the machine that built this binary; tests and the
/// benchmark use it.
pub fn built_components_dir() -> &'static Path {
    Path::new(env!("SANDBOX_POLICY_WASM_DIR"))
}

/// A component from [`built_components_dir`], by crate name (`demand-aware-sizing`).
pub fn built_component(crate_name: &str) -> PathBuf {
    built_components_dir().join(format!("{}.wasm", crate_name.replace('-', "_")))
}
