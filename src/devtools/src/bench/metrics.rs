//! Counts from Prometheus text: the apiserver's `apiserver_request_total` (every client's
//! writes, by resource and verb), the controller's own `sandbox_controller_api_writes_total` (by
//! target) and its reconciles (by kind).

use std::collections::BTreeMap;

use prometheus_parse::{Scrape, Value};

/// Counts keyed by a readable label (`"batchsandboxes/status PATCH"`, `"pod"`).
pub type Counts = BTreeMap<String, f64>;

/// Verbs of `apiserver_request_total` that change state.
const WRITE_VERBS: &[&str] = &[
    "POST",
    "PUT",
    "PATCH",
    "DELETE",
    "DELETECOLLECTION",
    "APPLY",
];

#[derive(Debug, thiserror::Error)]
#[error("could not parse Prometheus text: {0}")]
pub struct ParseError(#[from] std::io::Error);

fn scrape(text: &str) -> Result<Scrape, ParseError> {
    Ok(Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?)
}

fn counter_value(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Untyped(v) | Value::Gauge(v) => Some(*v),
        _ => None,
    }
}

/// Whether a sample named `name` belongs to the counter `base` (`base` or `base_total`).
fn is_counter(name: &str, base: &str) -> bool {
    name.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest == "_total")
}

/// Write requests the apiserver served, summed over codes and scopes, keyed
/// `"<resource>[/<subresource>] <VERB>"`.
pub fn apiserver_writes(text: &str) -> Result<Counts, ParseError> {
    let mut counts = Counts::new();
    for sample in scrape(text)?.samples {
        if !is_counter(&sample.metric, "apiserver_request") {
            continue;
        }
        let verb = sample.labels.get("verb").unwrap_or("");
        if !WRITE_VERBS.contains(&verb) {
            continue;
        }
        let Some(value) = counter_value(&sample.value) else {
            continue;
        };
        let resource = sample.labels.get("resource").unwrap_or("");
        let key = match sample.labels.get("subresource").unwrap_or("") {
            "" => format!("{resource} {verb}"),
            sub => format!("{resource}/{sub} {verb}"),
        };
        *counts.entry(key).or_default() += value;
    }
    Ok(counts)
}

/// The controller's writes by target (`batchsandbox`, `batchsandbox_status`, `pool_status`, ...).
pub fn controller_writes(text: &str) -> Result<Counts, ParseError> {
    let mut counts = Counts::new();
    for sample in scrape(text)?.samples {
        if !is_counter(&sample.metric, "sandbox_controller_api_writes") {
            continue;
        }
        if let (Some(target), Some(value)) =
            (sample.labels.get("target"), counter_value(&sample.value))
        {
            *counts.entry(target.to_owned()).or_default() += value;
        }
    }
    Ok(counts)
}

/// The controller's reconciles by kind (`Pool`, `BatchSandbox`): the count of its reconcile
/// duration histogram.
pub fn controller_reconciles(text: &str) -> Result<Counts, ParseError> {
    let mut counts = Counts::new();
    for sample in scrape(text)?.samples {
        if sample.metric != "sandbox_controller_reconcile_duration_seconds_count" {
            continue;
        }
        if let (Some(kind), Some(value)) = (sample.labels.get("kind"), counter_value(&sample.value))
        {
            *counts.entry(kind.to_owned()).or_default() += value;
        }
    }
    Ok(counts)
}

/// The policy decisions the controller asked for, by decision (`pool-sizing`, `shard-tasks`,
/// `expiry`, `pool-selection`): `sandbox_policy_decisions_total`. Answers the controller reused
/// are not asked for, so they are not counted.
pub fn policy_decisions(text: &str) -> Result<Counts, ParseError> {
    labelled_counter(text, "sandbox_policy_decisions_total", "decision")
}

/// Pool reconciles asked for, by cause (`pod`, `batch`, `status-reported`, ...):
/// `sandbox_controller_pool_wakes_total`.
pub fn pool_wakes(text: &str) -> Result<Counts, ParseError> {
    labelled_counter(text, "sandbox_controller_pool_wakes_total", "cause")
}

fn labelled_counter(text: &str, metric: &str, label: &str) -> Result<Counts, ParseError> {
    let mut counts = Counts::new();
    for sample in scrape(text)?.samples {
        if sample.metric != metric {
            continue;
        }
        if let (Some(key), Some(value)) = (sample.labels.get(label), counter_value(&sample.value)) {
            *counts.entry(key.to_owned()).or_default() += value;
        }
    }
    Ok(counts)
}

/// What the counters grew by between two scrapes; keys that did not grow are left out.
pub fn delta(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .filter_map(|(key, value)| {
            let grew = value - before.get(key).copied().unwrap_or(0.0);
            (grew > 0.0).then(|| (key.clone(), grew))
        })
        .collect()
}

/// Each count divided by `claims` (empty when there were none).
pub fn per_claim(counts: &Counts, claims: usize) -> Counts {
    if claims == 0 {
        return Counts::new();
    }
    counts
        .iter()
        .map(|(k, v)| (k.clone(), v / claims as f64))
        .collect()
}

/// The sum of all counts.
pub fn total(counts: &Counts) -> f64 {
    counts.values().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const APISERVER: &str = r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests
# TYPE apiserver_request_total counter
apiserver_request_total{code="201",component="apiserver",dry_run="",group="sandbox.opensandbox.io",resource="batchsandboxes",scope="resource",subresource="",verb="POST",version="v1alpha1"} 7
apiserver_request_total{code="409",component="apiserver",dry_run="",group="sandbox.opensandbox.io",resource="batchsandboxes",scope="resource",subresource="",verb="POST",version="v1alpha1"} 1
apiserver_request_total{code="200",component="apiserver",dry_run="",group="sandbox.opensandbox.io",resource="batchsandboxes",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 12
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="LIST",version="v1"} 99
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="binding",verb="POST",version="v1"} 3
# HELP apiserver_request_duration_seconds whatever
# TYPE apiserver_request_duration_seconds histogram
apiserver_request_duration_seconds_bucket{verb="POST",resource="pods",le="0.005"} 3
"#;

    #[test]
    fn apiserver_writes_by_resource_and_verb() {
        let counts = apiserver_writes(APISERVER).unwrap();
        let expected: Counts = [
            ("batchsandboxes POST".to_owned(), 8.0),
            ("batchsandboxes/status PATCH".to_owned(), 12.0),
            ("pods/binding POST".to_owned(), 3.0),
        ]
        .into();
        assert_eq!(counts, expected);
    }

    #[test]
    fn controller_writes_from_openmetrics_text() {
        let text = "# HELP sandbox_controller_api_writes API write requests made by the controller, by target.\n\
# TYPE sandbox_controller_api_writes counter\n\
sandbox_controller_api_writes_total{target=\"batchsandbox\"} 4\n\
sandbox_controller_api_writes_total{target=\"pod\"} 10\n\
sandbox_controller_other_total{target=\"pod\"} 99\n\
# EOF\n";
        let counts = controller_writes(text).unwrap();
        let expected: Counts = [("batchsandbox".to_owned(), 4.0), ("pod".to_owned(), 10.0)].into();
        assert_eq!(counts, expected);
    }

    #[test]
    fn controller_reconciles_from_the_duration_histograms_count() {
        let text = "# HELP sandbox_controller_reconcile_duration_seconds Time one reconcile took, by kind.\n\
# TYPE sandbox_controller_reconcile_duration_seconds histogram\n\
sandbox_controller_reconcile_duration_seconds_sum{kind=\"Pool\"} 0.25\n\
sandbox_controller_reconcile_duration_seconds_count{kind=\"Pool\"} 31\n\
sandbox_controller_reconcile_duration_seconds_bucket{le=\"0.001\",kind=\"Pool\"} 30\n\
sandbox_controller_reconcile_duration_seconds_bucket{le=\"+Inf\",kind=\"Pool\"} 31\n\
sandbox_controller_reconcile_duration_seconds_sum{kind=\"BatchSandbox\"} 0.5\n\
sandbox_controller_reconcile_duration_seconds_count{kind=\"BatchSandbox\"} 120\n\
sandbox_controller_reconcile_duration_seconds_bucket{le=\"+Inf\",kind=\"BatchSandbox\"} 120\n\
sandbox_controller_claim_duration_seconds_count{namespace=\"n\",pool=\"p\"} 7\n\
# EOF\n";
        let counts = controller_reconciles(text).unwrap();
        let expected: Counts = [
            ("BatchSandbox".to_owned(), 120.0),
            ("Pool".to_owned(), 31.0),
        ]
        .into();
        assert_eq!(counts, expected);
    }

    #[test]
    fn policy_decisions_by_decision() {
        let text = "# HELP sandbox_policy_decisions Decisions asked of the policy engine.\n\
# TYPE sandbox_policy_decisions counter\n\
sandbox_policy_decisions_total{decision=\"pool-sizing\"} 12\n\
sandbox_policy_decisions_total{decision=\"expiry\"} 3\n\
sandbox_policy_degraded_total{decision=\"expiry\",reason=\"trap\"} 1\n\
# EOF\n";
        let counts = policy_decisions(text).unwrap();
        let expected: Counts =
            [("expiry".to_owned(), 3.0), ("pool-sizing".to_owned(), 12.0)].into();
        assert_eq!(counts, expected);
    }

    #[test]
    fn pool_wakes_by_cause() {
        let text = "# TYPE sandbox_controller_pool_wakes counter\n\
sandbox_controller_pool_wakes_total{cause=\"pod\"} 40\n\
sandbox_controller_pool_wakes_total{cause=\"batch\"} 7\n\
sandbox_policy_decisions_total{decision=\"expiry\"} 3\n\
# EOF\n";
        let expected: Counts = [("batch".to_owned(), 7.0), ("pod".to_owned(), 40.0)].into();
        assert_eq!(pool_wakes(text).unwrap(), expected);
    }

    #[test]
    fn deltas_keep_what_grew() {
        let before: Counts = [("a".to_owned(), 5.0), ("b".to_owned(), 2.0)].into();
        let after: Counts = [
            ("a".to_owned(), 9.0),
            ("b".to_owned(), 2.0),
            ("c".to_owned(), 3.0),
        ]
        .into();
        let d = delta(&before, &after);
        assert_eq!(d, [("a".to_owned(), 4.0), ("c".to_owned(), 3.0)].into());
        assert_eq!(total(&d), 7.0);
        assert_eq!(
            per_claim(&d, 2),
            [("a".to_owned(), 2.0), ("c".to_owned(), 1.5)].into()
        );
        assert!(per_claim(&d, 0).is_empty());
    }
}
