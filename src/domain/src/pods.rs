//! Facts about a pod that every decision needs, read from its status alone.

use k8s_openapi::api::core::v1::Pod;

/// Whether the pod is Running and its Ready condition is True.
pub fn is_running_and_ready(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Whether the pod is being deleted.
pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Whether the pod can never run again (it finished or failed).
pub fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// Whether the pod still counts as a live sandbox: not terminating and not finished.
pub fn is_live(pod: &Pod) -> bool {
    !is_terminating(pod) && !is_finished(pod)
}

/// The pod's IP, once it has one.
pub fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
}

/// The pod's name (empty for an object without one, which the API never returns).
pub fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod fixtures {
    use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    /// A pod with the given name and, when `ready`, Running+Ready with an IP.
    pub fn pod(name: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(if ready { "Running" } else { "Pending" }.into()),
                pod_ip: ready.then(|| format!("127.1.0.{}", name.len())),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::pod;
    use super::*;

    #[test]
    fn readiness_needs_running_and_the_ready_condition() {
        assert!(is_running_and_ready(&pod("a", true)));
        assert!(!is_running_and_ready(&pod("a", false)));
        let mut running_unready = pod("a", true);
        running_unready.status.as_mut().unwrap().conditions = None;
        assert!(!is_running_and_ready(&running_unready));
    }
}
