//! Policy metrics, registered into the process's Prometheus registry.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::Decision;

/// Why a decision did not come from the policy the object selected, as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DegradedReason {
    /// The selected policy is not loaded; the default decided.
    NotLoaded,
    /// The latest revision failed to load; the last good one decided.
    StaleRevision,
    WrongWorld,
    OutOfFuel,
    Timeout,
    MemoryLimit,
    StackOverflow,
    Trap,
    /// The policy returned its own error.
    PolicyError,
    /// The policy's answer failed the host's checks.
    InvalidOutput,
}

impl DegradedReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotLoaded => "not-loaded",
            Self::StaleRevision => "stale-revision",
            Self::WrongWorld => "wrong-world",
            Self::OutOfFuel => "out-of-fuel",
            Self::Timeout => "timeout",
            Self::MemoryLimit => "memory-limit",
            Self::StackOverflow => "stack-overflow",
            Self::Trap => "trap",
            Self::PolicyError => "policy-error",
            Self::InvalidOutput => "invalid-output",
        }
    }
}

impl EncodeLabelValue for DegradedReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl EncodeLabelValue for Decision {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.name(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: Decision,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DegradedLabels {
    decision: Decision,
    reason: DegradedReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    result: &'static str,
}

/// Counters of one policy engine. Cheap to clone: clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct PolicyMetrics {
    decisions: Family<DecisionLabels, Counter>,
    degraded: Family<DegradedLabels, Counter>,
    loads: Family<LoadLabels, Counter>,
}

impl PolicyMetrics {
    /// Adds the counters to `registry` (as `sandbox_policy_*`).
    pub fn register(&self, registry: &mut Registry) {
        let policy = registry.sub_registry_with_prefix("sandbox_policy");
        policy.register(
            "decisions",
            "Decisions asked of the policy engine",
            self.decisions.clone(),
        );
        policy.register(
            "degraded",
            "Decisions that fell back or used a default because the selected policy failed",
            self.degraded.clone(),
        );
        policy.register(
            "loads",
            "Policy revisions loaded, by result",
            self.loads.clone(),
        );
    }

    pub fn decided(&self, decision: Decision) {
        self.decisions
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    pub fn degraded(&self, decision: Decision, reason: DegradedReason) {
        self.degraded
            .get_or_create(&DegradedLabels { decision, reason })
            .inc();
    }

    pub fn loaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.loads.get_or_create(&LoadLabels { result }).inc();
    }

    pub fn decisions(&self, decision: Decision) -> u64 {
        self.decisions
            .get_or_create(&DecisionLabels { decision })
            .get()
    }

    pub fn degraded_count(&self, decision: Decision, reason: DegradedReason) -> u64 {
        self.degraded
            .get_or_create(&DegradedLabels { decision, reason })
            .get()
    }

    /// Every degraded decision of `decision`, whatever the reason.
    pub fn degraded_total(&self, decision: Decision) -> u64 {
        DegradedReason::ALL
            .iter()
            .map(|&reason| self.degraded_count(decision, reason))
            .sum()
    }
}

impl DegradedReason {
    /// Every reason, for sums over all of them.
    pub const ALL: [DegradedReason; 10] = [
        Self::NotLoaded,
        Self::StaleRevision,
        Self::WrongWorld,
        Self::OutOfFuel,
        Self::Timeout,
        Self::MemoryLimit,
        Self::StackOverflow,
        Self::Trap,
        Self::PolicyError,
        Self::InvalidOutput,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn counters_render_with_labels() {
        let metrics = PolicyMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.decided(Decision::Expiry);
        metrics.degraded(Decision::Expiry, DegradedReason::Timeout);
        metrics.degraded(Decision::Expiry, DegradedReason::Trap);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encoding metrics");
        assert!(
            text.contains("sandbox_policy_decisions_total{decision=\"expiry\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "sandbox_policy_degraded_total{decision=\"expiry\",reason=\"timeout\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("sandbox_policy_degraded_total{decision=\"expiry\",reason=\"trap\"} 1"),
            "{text}"
        );
        assert_eq!(metrics.degraded_total(Decision::Expiry), 2);
        assert_eq!(metrics.degraded_total(Decision::PoolSizing), 0);
    }
}
