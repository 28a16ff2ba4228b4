//! Counts of the API writes the controller makes, by target, so the cost of a claim can be
//! measured (`/metrics`, and the `sandbox-bench` figures).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// What a write went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    BatchObject,
    BatchStatus,
    PoolObject,
    PoolStatus,
    Pod,
    Event,
}

impl Target {
    /// The `target` label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Target::BatchObject => "batchsandbox",
            Target::BatchStatus => "batchsandbox_status",
            Target::PoolObject => "pool",
            Target::PoolStatus => "pool_status",
            Target::Pod => "pod",
            Target::Event => "event",
        }
    }

    /// The target for a write to an object (or its status) of `kind`.
    pub fn for_kind(kind: &str, status: bool) -> Self {
        match (kind, status) {
            ("Pool", false) => Target::PoolObject,
            ("Pool", true) => Target::PoolStatus,
            ("Pod", _) => Target::Pod,
            (_, false) => Target::BatchObject,
            (_, true) => Target::BatchStatus,
        }
    }
}

impl EncodeLabelValue for Target {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.label(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    target: Target,
}

/// API writes by target (`sandbox_controller_api_writes_total`). Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct WriteCounter {
    writes: Family<WriteLabels, Counter>,
}

impl WriteCounter {
    /// Adds the counter to `registry`, whose prefix should be `sandbox_controller`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "api_writes",
            "API write requests made by the controller, by target",
            self.writes.clone(),
        );
    }

    pub fn count(&self, target: Target) {
        self.writes.get_or_create(&WriteLabels { target }).inc();
    }
}
