//! The default shard-task policy: [`sandbox_decisions::tasks::template_merge`] (`taskTemplate`
//! merged with `shardTaskPatches[i]`) behind the `shard-tasks` interface.

#![no_std]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

wit_bindgen::generate!({ world: "shard-tasks-policy", path: "../../../wit" });

// Each instance serves one call: allocation bumps a pointer and nothing is freed.
use exports::opensandbox::policy::shard_tasks as wit;
use guest_heap as _;
use sandbox_decisions::{Bridge, bridge_shard_tasks, settings, tasks};

bridge_shard_tasks!(wit);

struct TemplateMerge;

impl wit::Guest for TemplateMerge {
    fn validate_settings(text: String) -> Result<(), wit::PolicyError> {
        settings::none("shard-tasks", &text).map_err(Bridge::bridge)
    }

    fn decide(
        _settings: String,
        batch: wit::BatchInput,
    ) -> Result<Vec<Option<wit::TaskSpec>>, wit::PolicyError> {
        Ok(tasks::template_merge(&batch.bridge()).bridge())
    }
}

export!(TemplateMerge);
