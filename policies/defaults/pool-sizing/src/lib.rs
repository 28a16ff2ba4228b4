//! The default pool-sizing policy: [`sandbox_decisions::sizing::buffer_sizing`] behind the
//! `pool-sizing` interface. The decision itself lives in `sandbox-decisions`, which the controller
//! runs natively as its fail-safe, so the two cannot differ.

#![no_std]

extern crate alloc;

use alloc::string::String;

wit_bindgen::generate!({ world: "pool-sizing-policy", path: "../../../wit" });

// Each instance serves one call: allocation bumps a pointer and nothing is freed.
use exports::opensandbox::policy::pool_sizing as wit;
use guest_heap as _;
use sandbox_decisions::{Bridge, bridge_pool_sizing, settings, sizing};

bridge_pool_sizing!(wit);

struct BufferSizing;

impl wit::Guest for BufferSizing {
    fn validate_settings(text: String) -> Result<(), wit::PolicyError> {
        settings::none("pool-sizing", &text).map_err(Bridge::bridge)
    }

    fn decide(
        _settings: String,
        pool: wit::PoolSnapshot,
    ) -> Result<wit::SizingDecision, wit::PolicyError> {
        Ok(sizing::buffer_sizing(&pool.bridge()).bridge())
    }
}

export!(BufferSizing);
