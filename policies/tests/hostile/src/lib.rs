//! A deliberately hostile policy for the controller's fail-safe tests. It implements all four
//! decisions and misbehaves as its settings say: `{"mode": "<mode>"}`.
//!
//! Modes: `ok` (a plausible answer), `loop` (never returns), `memory-bomb` (allocates until
//! refused), `trap` (panics), `garbage` (an answer the host must reject), `stack-overflow`,
//! `wasi` (calls a WASI clock the host does not grant), `bad-settings` (refuses to load),
//! `loop-on-load` (never returns from validate-settings), `remember` (pool-sizing reports what
//! earlier calls left in its memory).

wit_bindgen::generate!({ world: "all-policies", path: "../../../wit" });

use exports::opensandbox::policy::{expiry, pool_selection, pool_sizing, shard_tasks};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    mode: String,
}

fn mode(text: &str) -> String {
    serde_json::from_str::<Settings>(text)
        .map(|s| s.mode)
        .unwrap_or_default()
}

/// Misbehaves, or returns for the modes that need a decision-specific answer.
fn misbehave(mode: &str) {
    match mode {
        "loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "memory-bomb" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
            }
        }
        "trap" => panic!("hostile policy panics on purpose"),
        "stack-overflow" => {
            std::hint::black_box(recurse(std::hint::black_box(1)));
        }
        "wasi" => {
            let now = std::time::SystemTime::now();
            std::hint::black_box(now);
        }
        _ => {}
    }
}

/// What this call finds left by earlier calls: a counter in its data segment, and a marker in
/// the page it grows its memory by. An instance as fresh as the host promises shows neither.
fn leftovers() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    const MARKER: u64 = 0x5eed_5eed_5eed_5eed;
    let earlier = CALLS.fetch_add(1, Ordering::Relaxed);
    let pages = core::arch::wasm32::memory_grow(0, 1);
    if pages == usize::MAX {
        return format!("earlier calls {earlier}, memory did not grow");
    }
    let page = (pages * 65536) as *mut u64;
    // SAFETY: the page was just added to linear memory and nothing else knows of it.
    let held = unsafe {
        let held = page.read_volatile();
        page.write_volatile(MARKER);
        held
    };
    format!("earlier calls {earlier}, grown page held {held:#x}")
}

#[allow(unconditional_recursion, reason = "overflowing the stack is the point")]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    recurse(depth + 1).wrapping_add(frame[depth as usize % 64])
}

fn validate(text: &str) -> Result<(), String> {
    match mode(text).as_str() {
        "bad-settings" => Err("hostile policy refuses its settings".into()),
        "loop-on-load" => {
            misbehave("loop");
            Ok(())
        }
        "ok" | "loop" | "memory-bomb" | "trap" | "garbage" | "stack-overflow" | "wasi"
        | "remember" => Ok(()),
        other => Err(format!("unknown mode {other:?}")),
    }
}

struct Hostile;

impl pool_sizing::Guest for Hostile {
    fn validate_settings(settings: String) -> Result<(), pool_sizing::PolicyError> {
        validate(&settings).map_err(pool_sizing::PolicyError::InvalidSettings)
    }

    fn decide(
        settings: String,
        pool: pool_sizing::PoolSnapshot,
    ) -> Result<pool_sizing::SizingDecision, pool_sizing::PolicyError> {
        let mode = mode(&settings);
        misbehave(&mode);
        let desired_total = if mode == "garbage" {
            pool.bounds.pool_max.saturating_add(1000)
        } else {
            pool.bounds.pool_max
        };
        let reason = if mode == "remember" {
            leftovers()
        } else {
            format!("hostile policy in mode {mode}")
        };
        Ok(pool_sizing::SizingDecision {
            desired_total,
            reason,
        })
    }
}

impl shard_tasks::Guest for Hostile {
    fn validate_settings(settings: String) -> Result<(), shard_tasks::PolicyError> {
        validate(&settings).map_err(shard_tasks::PolicyError::InvalidSettings)
    }

    fn decide(
        settings: String,
        batch: shard_tasks::BatchInput,
    ) -> Result<Vec<Option<shard_tasks::TaskSpec>>, shard_tasks::PolicyError> {
        let mode = mode(&settings);
        misbehave(&mode);
        let slots = if mode == "garbage" {
            batch.replicas as usize + 1
        } else {
            batch.replicas as usize
        };
        Ok(vec![None; slots])
    }
}

impl expiry::Guest for Hostile {
    fn validate_settings(settings: String) -> Result<(), expiry::PolicyError> {
        validate(&settings).map_err(expiry::PolicyError::InvalidSettings)
    }

    fn decide(
        settings: String,
        _batch: expiry::BatchSnapshot,
    ) -> Result<expiry::ExpiryDecision, expiry::PolicyError> {
        let mode = mode(&settings);
        misbehave(&mode);
        Ok(expiry::ExpiryDecision::Keep(Some(if mode == "garbage" {
            u64::MAX
        } else {
            1000
        })))
    }
}

impl pool_selection::Guest for Hostile {
    fn validate_settings(settings: String) -> Result<(), pool_selection::PolicyError> {
        validate(&settings).map_err(pool_selection::PolicyError::InvalidSettings)
    }

    fn decide(
        settings: String,
        input: pool_selection::SelectionInput,
    ) -> Result<pool_selection::SelectionDecision, pool_selection::PolicyError> {
        let mode = mode(&settings);
        misbehave(&mode);
        let pool = if mode == "garbage" {
            Some("no-such-pool".to_string())
        } else {
            input.pools.last().map(|p| p.pool_name.clone())
        };
        Ok(pool_selection::SelectionDecision {
            pool,
            reason: format!("hostile policy in mode {mode}"),
        })
    }
}

export!(Hostile);
