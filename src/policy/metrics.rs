//! Policy counters: plain atomics, rendered in the Prometheus text format for `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::host::Decision;

/// Why a decision was degraded, as a metric label.
pub const DEGRADED_REASONS: &[&str] = &[
    "not-loaded",
    "stale-revision",
    "wrong-world",
    "out-of-fuel",
    "timeout",
    "memory-limit",
    "stack-overflow",
    "trap",
    "policy-error",
    "invalid-output",
];

/// Counters of one policy engine. All methods are lock-free.
#[derive(Debug)]
pub struct PolicyMetrics {
    /// Decisions made, by decision.
    decisions: [AtomicU64; 3],
    /// Degraded decisions, by decision and [`DEGRADED_REASONS`] entry.
    degraded: [[AtomicU64; DEGRADED_REASONS.len()]; 3],
    loads_ok: AtomicU64,
    loads_failed: AtomicU64,
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        Self {
            decisions: Default::default(),
            degraded: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            loads_ok: AtomicU64::new(0),
            loads_failed: AtomicU64::new(0),
        }
    }
}

impl PolicyMetrics {
    pub fn decided(&self, decision: Decision) {
        self.decisions[decision.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a degraded decision; `reason` is one of [`DEGRADED_REASONS`] (others count as `trap`).
    pub fn degraded(&self, decision: Decision, reason: &str) {
        let position = |label: &str| DEGRADED_REASONS.iter().position(|r| *r == label);
        let index = position(reason)
            .or_else(|| position("trap"))
            .unwrap_or_default();
        self.degraded[decision.index()][index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn loaded(&self, ok: bool) {
        let counter = if ok {
            &self.loads_ok
        } else {
            &self.loads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn decisions(&self, decision: Decision) -> u64 {
        self.decisions[decision.index()].load(Ordering::Relaxed)
    }

    pub fn degraded_count(&self, decision: Decision, reason: &str) -> u64 {
        DEGRADED_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| {
                self.degraded[decision.index()][i].load(Ordering::Relaxed)
            })
    }

    /// Every degraded decision of `decision`, whatever the reason.
    pub fn degraded_total(&self, decision: Decision) -> u64 {
        self.degraded[decision.index()]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The counters in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP sandbox_policy_decisions_total Decisions asked of the policy engine.\n",
        );
        out.push_str("# TYPE sandbox_policy_decisions_total counter\n");
        for d in Decision::ALL {
            let _ = writeln!(
                out,
                "sandbox_policy_decisions_total{{decision=\"{d}\"}} {}",
                self.decisions(d)
            );
        }
        out.push_str("# HELP sandbox_policy_degraded_total Decisions that fell back or used a default because the selected policy failed.\n");
        out.push_str("# TYPE sandbox_policy_degraded_total counter\n");
        for d in Decision::ALL {
            for (i, reason) in DEGRADED_REASONS.iter().enumerate() {
                let n = self.degraded[d.index()][i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "sandbox_policy_degraded_total{{decision=\"{d}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP sandbox_policy_loads_total Policy revisions loaded, by result.\n");
        out.push_str("# TYPE sandbox_policy_loads_total counter\n");
        let _ = writeln!(
            out,
            "sandbox_policy_loads_total{{result=\"ok\"}} {}",
            self.loads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "sandbox_policy_loads_total{{result=\"error\"}} {}",
            self.loads_failed.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_labels() {
        let m = PolicyMetrics::default();
        m.decided(Decision::Expiry);
        m.degraded(Decision::Expiry, "timeout");
        m.degraded(Decision::Expiry, "something-new");
        let text = m.render();
        assert!(text.contains("sandbox_policy_decisions_total{decision=\"expiry\"} 1"));
        assert!(
            text.contains(
                "sandbox_policy_degraded_total{decision=\"expiry\",reason=\"timeout\"} 1"
            )
        );
        assert!(
            text.contains("sandbox_policy_degraded_total{decision=\"expiry\",reason=\"trap\"} 1")
        );
        assert_eq!(m.degraded_total(Decision::Expiry), 2);
        assert_eq!(m.degraded_total(Decision::PoolSizing), 0);
    }
}
