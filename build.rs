//! Builds the policy guests under `policies/` for wasm32-wasip2 and leaves the components in
//! `$OUT_DIR/policies/`, where `src/policy/builtin.rs` embeds the defaults with `include_bytes!`.
//!
//! The guests are a cargo workspace of their own, built by a nested cargo with its OWN target
//! directory: reusing the outer one would wait forever on the lock the outer build holds.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Components the controller embeds or its tests load, by crate name.
const COMPONENTS: &[&str] = &[
    "default-pool-sizing",
    "default-shard-tasks",
    "default-expiry",
    "demand-aware-sizing",
    "expiry-grace",
    "hostile",
];

/// Sources whose change must rebuild the guests.
const WATCHED: &[&str] = &[
    "wit",
    "policies/Cargo.toml",
    "policies/Cargo.lock",
    "policies/defaults",
    "policies/tests",
];
/// The Rust examples; other languages' examples have their own build and are not embedded.
const WATCHED_EXAMPLES: &[&str] = &[
    "policies/examples/demand-aware-sizing",
    "policies/examples/expiry-grace",
];

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for path in WATCHED.iter().chain(WATCHED_EXAMPLES) {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=SANDBOX_POLICY_TARGET_DIR");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    check_target_installed();
    let target_dir = guest_target_dir(&out_dir);
    let mut build = Command::new(&cargo);
    build
        .current_dir(manifest_dir.join("policies"))
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    for name in COMPONENTS {
        build.args(["--package", name]);
    }
    // The outer build's settings describe the host build, not the guests'.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        build.env_remove(var);
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("running {cargo:?} to build the policy guests: {e}"));
    if !status.success() {
        panic!(
            "building the policy guests in policies/ for {TARGET} failed ({status}); see the cargo output above"
        );
    }

    let built = target_dir.join(TARGET).join("release");
    let dest = out_dir.join("policies");
    std::fs::create_dir_all(&dest).unwrap_or_else(|e| panic!("creating {}: {e}", dest.display()));
    for name in COMPONENTS {
        let file = format!("{}.wasm", name.replace('-', "_"));
        copy(&built.join(&file), &dest.join(&file));
    }
    println!("cargo:rustc-env=SANDBOX_POLICY_WASM_DIR={}", dest.display());
}

/// `$SANDBOX_POLICY_TARGET_DIR`, else a cache directory under `$HOME` so guests stay built across
/// `cargo clean` and worktrees, else one inside `OUT_DIR`.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("SANDBOX_POLICY_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    match env::var_os("HOME") {
        Some(home) => PathBuf::from(home)
            .join(".cache")
            .join("sbx-policies-target"),
        None => out_dir.join("policies-target"),
    }
}

/// A missing target otherwise surfaces as a cryptic "can't find crate for `core`".
fn check_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output();
    let Ok(output) = sysroot else { return };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !sysroot.join("lib").join("rustlib").join(TARGET).exists() {
        panic!(
            "the {TARGET} Rust target is not installed ({} has no lib/rustlib/{TARGET}); the default \
             policies are built for it. Install it with: rustup target add {TARGET}",
            sysroot.display()
        );
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
