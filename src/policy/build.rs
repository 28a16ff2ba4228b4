//! Builds the policy guests under `policies/` for wasm32-wasip2 and leaves the components in
//! `$OUT_DIR/policies/`, where `src/embedded.rs` embeds the defaults with `include_bytes!`.
//!
//! The guests are a cargo workspace of their own, built by a nested cargo with its OWN target
//! directory: reusing the outer one would wait forever on the lock the outer build holds.
//!
//! Where the wasm32-wasip2 target is not installed (it is downloaded by rustup, not from a package
//! registry), the components committed under `policies/prebuilt/` are used instead. A unit test
//! compares them with a fresh build wherever the target exists; `SANDBOX_POLICY_UPDATE_PREBUILT=1
//! cargo build` (`make policies`) refreshes them. Source paths are remapped so a build's bytes do
//! not depend on where the repository is checked out.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Components the controller embeds or its tests load, by crate name.
const COMPONENTS: &[&str] = &[
    "default-pool-sizing",
    "default-shard-tasks",
    "default-expiry",
    "default-pool-selection",
    "demand-aware-sizing",
    "expiry-grace",
    "hostile",
];

/// Sources whose change must rebuild the guests, relative to the repository's root.
const WATCHED: &[&str] = &[
    "wit",
    // The decisions the default guests adapt, and their heap.
    "src/decisions",
    "src/guest-heap",
    "policies/Cargo.toml",
    "policies/Cargo.lock",
    "policies/defaults",
    "policies/tests",
    "policies/prebuilt",
    // The Rust examples; other languages' examples have their own build and are not embedded.
    "policies/examples/demand-aware-sizing",
    "policies/examples/expiry-grace",
];

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    // This crate lives in src/policy; the guests, wit/ and the prebuilt components at the root.
    let repo = manifest_dir
        .ancestors()
        .nth(2)
        .expect("src/policy has a repository root two levels up")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for path in WATCHED {
        println!("cargo:rerun-if-changed={}", repo.join(path).display());
    }
    for var in [
        "SANDBOX_POLICY_TARGET_DIR",
        "SANDBOX_POLICY_UPDATE_PREBUILT",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let prebuilt = repo.join("policies").join("prebuilt");
    let dest = out_dir.join("policies");
    std::fs::create_dir_all(&dest).unwrap_or_else(|e| panic!("creating {}: {e}", dest.display()));
    println!("cargo:rustc-env=SANDBOX_POLICY_WASM_DIR={}", dest.display());
    println!(
        "cargo:rustc-env=SANDBOX_POLICY_PREBUILT_DIR={}",
        prebuilt.display()
    );

    // Tests that compare the committed prebuilt components with a fresh build run only when
    // there was a fresh build.
    println!("cargo::rustc-check-cfg=cfg(policies_from_source)");
    let built = match missing_target() {
        None => {
            println!("cargo:rustc-cfg=policies_from_source");
            build_guests(&repo, &out_dir)
        }
        Some(why) => {
            println!(
                "cargo:warning={why}; using the committed components in policies/prebuilt/ \
                 (install the target with `rustup target add {TARGET}` to build them from source)"
            );
            prebuilt.clone()
        }
    };
    let update = env::var_os("SANDBOX_POLICY_UPDATE_PREBUILT").is_some_and(|v| v == "1");
    for name in COMPONENTS {
        let file = wasm_file(name);
        copy(&built.join(&file), &dest.join(&file));
        if update && built != prebuilt {
            copy(&built.join(&file), &prebuilt.join(&file));
        }
    }
}

fn wasm_file(crate_name: &str) -> String {
    format!("{}.wasm", crate_name.replace('-', "_"))
}

/// Builds every component with the nested cargo; returns the directory holding them.
fn build_guests(repo: &Path, out_dir: &Path) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = guest_target_dir(out_dir);
    let mut build = Command::new(&cargo);
    build
        .current_dir(repo.join("policies"))
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
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        build.env_remove(var);
    }
    build.env("CARGO_ENCODED_RUSTFLAGS", remap_flags(repo));
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("running {cargo:?} to build the policy guests: {e}"));
    if !status.success() {
        panic!(
            "building the policy guests in policies/ for {TARGET} failed ({status}); see the cargo output above"
        );
    }
    target_dir.join(TARGET).join("release")
}

/// Paths embedded in the components (panic locations) made independent of the checkout and of
/// the cargo home, so the same sources give the same bytes anywhere.
fn remap_flags(repo: &Path) -> String {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    let mut flags = vec![format!(
        "--remap-path-prefix={}=/opensandbox",
        repo.display()
    )];
    if let Some(home) = cargo_home {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    flags.join("\u{1f}")
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

/// Why the guests cannot be built here, if they cannot: a missing target otherwise surfaces as a
/// cryptic "can't find crate for `core`".
fn missing_target() -> Option<String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = match Command::new(&rustc).args(["--print", "sysroot"]).output() {
        Ok(output) if output.status.success() => output,
        _ => return Some(format!("`{rustc:?} --print sysroot` failed")),
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let target = sysroot.join("lib").join("rustlib").join(TARGET);
    (!target.exists()).then(|| {
        format!(
            "the {TARGET} Rust target is not installed (no {})",
            target.display()
        )
    })
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
