//! The default expiry policy: [`sandbox_decisions::expiry::at_expire_time`] (expire exactly at
//! `expireTime`, recheck when it falls due) behind the `expiry` interface.

#![no_std]

extern crate alloc;

use alloc::string::String;

wit_bindgen::generate!({ world: "expiry-policy", path: "../../../wit" });

// Each instance serves one call: allocation bumps a pointer and nothing is freed.
use exports::opensandbox::policy::expiry as wit;
use guest_heap as _;
use sandbox_decisions::{Bridge, bridge_expiry, expiry, settings};

bridge_expiry!(wit);

struct AtExpireTime;

impl wit::Guest for AtExpireTime {
    fn validate_settings(text: String) -> Result<(), wit::PolicyError> {
        settings::none("expiry", &text).map_err(Bridge::bridge)
    }

    fn decide(
        _settings: String,
        batch: wit::BatchSnapshot,
    ) -> Result<wit::ExpiryDecision, wit::PolicyError> {
        Ok(expiry::at_expire_time(&batch.bridge()).bridge())
    }
}

export!(AtExpireTime);
