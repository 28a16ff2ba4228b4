//! The default pool-selection policy: [`sandbox_decisions::selection::least_allocated_fit`] (the
//! least allocated pool whose pods fit the batch's template) behind the `pool-selection` interface.

#![no_std]

extern crate alloc;

use alloc::string::String;

wit_bindgen::generate!({ world: "pool-selection-policy", path: "../../../wit" });

// Each instance serves one call: allocation bumps a pointer and nothing is freed.
use exports::opensandbox::policy::pool_selection as wit;
use guest_heap as _;
use sandbox_decisions::{Bridge, bridge_pool_selection, selection, settings};

bridge_pool_selection!(wit);

struct LeastAllocatedFit;

impl wit::Guest for LeastAllocatedFit {
    fn validate_settings(text: String) -> Result<(), wit::PolicyError> {
        settings::none("pool-selection", &text).map_err(Bridge::bridge)
    }

    fn decide(
        _settings: String,
        input: wit::SelectionInput,
    ) -> Result<wit::SelectionDecision, wit::PolicyError> {
        Ok(selection::least_allocated_fit(&input.bridge()).bridge())
    }
}

export!(LeastAllocatedFit);
