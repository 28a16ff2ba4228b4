//! Host bindings generated from `wit/` (one module per world), and their conversions to the
//! decision types of `sandbox-decisions` (the same conversions the default guests use).

pub mod sizing {
    wasmtime::component::bindgen!({ world: "pool-sizing-policy", path: "../../wit" });
    pub use exports::opensandbox::policy::pool_sizing as wit;
    sandbox_decisions::bridge_pool_sizing!(wit);
}

pub mod shard {
    wasmtime::component::bindgen!({ world: "shard-tasks-policy", path: "../../wit" });
    pub use exports::opensandbox::policy::shard_tasks as wit;
    sandbox_decisions::bridge_shard_tasks!(wit);
}

pub mod selection {
    wasmtime::component::bindgen!({ world: "pool-selection-policy", path: "../../wit" });
    pub use exports::opensandbox::policy::pool_selection as wit;
    sandbox_decisions::bridge_pool_selection!(wit);
}

pub mod expiry {
    wasmtime::component::bindgen!({ world: "expiry-policy", path: "../../wit" });
    pub use exports::opensandbox::policy::expiry as wit;
    sandbox_decisions::bridge_expiry!(wit);
}
