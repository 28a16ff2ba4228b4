//! What an operator alerts on: reconcile durations and errors by kind, claim latency and pod
//! counts by pool, and the API writes by target ([`WriteCounter`]).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{Error, WriteCounter};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    namespace: String,
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStateLabels {
    namespace: String,
    pool: String,
    state: &'static str,
}

/// What woke a Pool's reconcile (timed rechecks a round asks for are not wakes).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum PoolWake {
    /// One of its pods changed in a way its round reads, appeared or went.
    Pod,
    /// One of its batches changed what the pool allocates from (demand, ledger, deletion).
    Batch,
    /// The last batch status its sizing waited for was written.
    StatusReported,
    /// The Pool object changed beyond its status.
    Pool,
    /// A grant write was answered in the background (refused, rejected, raced, unknown).
    Grant,
    /// A relist or a change of policies: every pool is looked at again.
    Everything,
}

impl PoolWake {
    const ALL: [PoolWake; 6] = [
        PoolWake::Pod,
        PoolWake::Batch,
        PoolWake::StatusReported,
        PoolWake::Pool,
        PoolWake::Grant,
        PoolWake::Everything,
    ];

    fn label(self) -> &'static str {
        match self {
            PoolWake::Pod => "pod",
            PoolWake::Batch => "batch",
            PoolWake::StatusReported => "status-reported",
            PoolWake::Pool => "pool",
            PoolWake::Grant => "grant",
            PoolWake::Everything => "everything",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WakeLabels {
    cause: &'static str,
}

/// The controller's metrics. Clones share them.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    pub writes: WriteCounter,
    reconcile_seconds: Family<KindLabels, Histogram>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    claim_seconds: Family<PoolLabels, Histogram>,
    pool_pods: Family<PoolStateLabels, Gauge>,
    pool_wakes: Family<WakeLabels, Counter>,
    /// The family's counters by [`PoolWake`], made once: every pod event may wake a pool, and
    /// the family's lookup hashes its labels under a lock.
    pool_wake_counters: [Counter; PoolWake::ALL.len()],
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        // 1 ms to ~33 s: a reconcile is milliseconds, a slow API server makes it seconds.
        let reconcile = || {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 16,
            ))
        };
        // 0.5 s to ~8.5 min, at the 1 s resolution of the creation timestamp it starts from.
        let claim = || {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.5, 2.0, 11,
            ))
        };
        let pool_wakes = Family::<WakeLabels, Counter>::default();
        Self {
            writes: WriteCounter::default(),
            reconcile_seconds: Family::new_with_constructor(reconcile),
            reconcile_errors: Family::default(),
            claim_seconds: Family::new_with_constructor(claim),
            pool_pods: Family::default(),
            pool_wake_counters: PoolWake::ALL.map(|cause| {
                pool_wakes
                    .get_or_create(&WakeLabels {
                        cause: cause.label(),
                    })
                    .clone()
            }),
            pool_wakes,
        }
    }
}

impl ControllerMetrics {
    /// Adds everything to `registry`, whose prefix should be `sandbox_controller`.
    pub fn register(&self, registry: &mut Registry) {
        self.writes.register(registry);
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took, by kind",
            self.reconcile_seconds.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed (and are retried with backoff), by kind and reason",
            self.reconcile_errors.clone(),
        );
        registry.register(
            "claim_duration_seconds",
            "From a pooled BatchSandbox's creation to the write that gives it all its pods, by pool",
            self.claim_seconds.clone(),
        );
        registry.register(
            "pool_pods",
            "A pool's pods by state: idle (Running and Ready, not allocated), allocated, pending",
            self.pool_pods.clone(),
        );
        registry.register(
            "pool_wakes",
            "Pool reconciles asked for, by what asked (a pool already queued runs once for several)",
            self.pool_wakes.clone(),
        );
    }

    pub fn pool_woken(&self, cause: PoolWake) {
        self.pool_wake_counters[cause as usize].inc();
    }

    /// How many times pools were woken for `cause`.
    #[cfg(test)]
    pub fn pool_wakes(&self, cause: PoolWake) -> u64 {
        self.pool_wake_counters[cause as usize].get()
    }

    pub fn reconciled(&self, kind: &'static str, took: Duration, result: Result<(), &Error>) {
        self.reconcile_seconds
            .get_or_create(&KindLabels { kind })
            .observe(took.as_secs_f64());
        if let Err(error) = result {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    kind,
                    reason: error.reason(),
                })
                .inc();
        }
    }

    pub fn claimed(&self, namespace: &str, pool: &str, since_creation: Duration) {
        self.claim_seconds
            .get_or_create(&PoolLabels {
                namespace: namespace.into(),
                pool: pool.into(),
            })
            .observe(since_creation.as_secs_f64());
    }

    /// The pool's current pod counts.
    pub fn pool_pods(&self, namespace: &str, pool: &str, idle: u32, allocated: u32, pending: u32) {
        for (state, count) in [
            ("idle", idle),
            ("allocated", allocated),
            ("pending", pending),
        ] {
            self.pool_pods
                .get_or_create(&PoolStateLabels {
                    namespace: namespace.into(),
                    pool: pool.into(),
                    state,
                })
                .set(i64::from(count));
        }
    }

    /// Drops a deleted pool's series, so dashboards do not show it forever.
    pub fn forget_pool(&self, namespace: &str, pool: &str) {
        for state in ["idle", "allocated", "pending"] {
            self.pool_pods.remove(&PoolStateLabels {
                namespace: namespace.into(),
                pool: pool.into(),
                state,
            });
        }
        self.claim_seconds.remove(&PoolLabels {
            namespace: namespace.into(),
            pool: pool.into(),
        });
    }
}

impl Error {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        if self.is_lost_race() {
            return "conflict";
        }
        match self {
            Error::Kube(kube::Error::Api(_)) => "api-error",
            Error::Kube(_) => "api-unreachable",
            Error::CorruptAllocStatus { .. } => "corrupt-ledger",
            Error::ShardPatch(_) => "bad-shard-patch",
            Error::PolicyThread(_) => "policy-thread",
            Error::Conflict(_) => "conflict",
            Error::Fenced(_) => "fenced",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn each_wake_cause_has_its_own_counter() {
        for (index, cause) in PoolWake::ALL.into_iter().enumerate() {
            assert_eq!(cause as usize, index, "{cause:?}");
        }
        let metrics = ControllerMetrics::default();
        metrics.pool_woken(PoolWake::Grant);
        for cause in PoolWake::ALL {
            let expected = u64::from(cause == PoolWake::Grant);
            assert_eq!(metrics.pool_wakes(cause), expected, "{cause:?}");
        }
    }

    #[test]
    fn series_render_with_their_labels_and_a_deleted_pool_goes_away() {
        let metrics = ControllerMetrics::default();
        let mut registry = Registry::with_prefix("sandbox_controller");
        metrics.register(&mut registry);
        metrics.reconciled("Pool", Duration::from_millis(3), Err(&Error::Conflict(1)));
        metrics.claimed("team", "fast", Duration::from_millis(700));
        metrics.pool_pods("team", "fast", 4, 2, 1);
        metrics.pool_woken(PoolWake::StatusReported);
        metrics.pool_woken(PoolWake::StatusReported);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encoding");
        let has = |parts: &[&str]| text.lines().any(|l| parts.iter().all(|p| l.contains(p)));
        for parts in [
            &["sandbox_controller_reconcile_duration_seconds_count{kind=\"Pool\"} 1"][..],
            &["sandbox_controller_reconcile_errors_total{kind=\"Pool\",reason=\"conflict\"} 1"],
            &[
                "sandbox_controller_claim_duration_seconds_bucket{",
                "le=\"1.0\"",
                "pool=\"fast\"",
                "} 1",
            ],
            &[
                "sandbox_controller_claim_duration_seconds_bucket{",
                "le=\"0.5\"",
                "pool=\"fast\"",
                "} 0",
            ],
            &["sandbox_controller_pool_pods{namespace=\"team\",pool=\"fast\",state=\"idle\"} 4"],
            &[
                "sandbox_controller_pool_pods{namespace=\"team\",pool=\"fast\",state=\"allocated\"} 2",
            ],
            &["sandbox_controller_pool_wakes_total{cause=\"status-reported\"} 2"],
        ] {
            assert!(has(parts), "{parts:?} missing from\n{text}");
        }
        metrics.forget_pool("team", "fast");
        let mut text = String::new();
        encode(&mut text, &registry).expect("encoding");
        assert!(!text.contains("pool=\"fast\""), "{text}");
    }
}
