//! The `sandbox.opensandbox.io/endpoints` annotation.
//!
//! Two forms are in use: objects, as the spec shows them, and the plain list of IP strings that
//! OpenSandbox's own server and controller read and write. Which one a batch gets is decided here
//! from the batch alone, so every client reads its own form without a flag.

use std::collections::BTreeMap;

use serde::Serialize;

/// The label OpenSandbox's server puts on every BatchSandbox it creates (template and pool
/// mode): the sandbox's id. Its presence is what [`EndpointsFormat::Auto`] looks for.
pub const OPENSANDBOX_SERVER_LABEL: &str = "opensandbox.io/id";

/// How the endpoints annotation is written (`--endpoints-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointsFormat {
    /// IP strings for BatchSandboxes of OpenSandbox's server (label `opensandbox.io/id`),
    /// objects for all others.
    #[default]
    Auto,
    /// `[{"sandbox_id":"0","ip":"..."}, ...]`, as the spec shows, for every batch.
    Objects,
    /// `["ip0", "ip1", ...]`, the plain list OpenSandbox's server reads, for every batch.
    Ips,
}

/// The form one batch's annotation takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointsForm {
    Objects,
    Ips,
}

impl EndpointsFormat {
    /// The form for a batch with these labels.
    pub fn for_labels(self, labels: &BTreeMap<String, String>) -> EndpointsForm {
        match self {
            EndpointsFormat::Objects => EndpointsForm::Objects,
            EndpointsFormat::Ips => EndpointsForm::Ips,
            EndpointsFormat::Auto if labels.contains_key(OPENSANDBOX_SERVER_LABEL) => {
                EndpointsForm::Ips
            }
            EndpointsFormat::Auto => EndpointsForm::Objects,
        }
    }
}

#[derive(Serialize)]
struct Endpoint<'a> {
    sandbox_id: String,
    ip: &'a str,
}

/// The annotation value for shards in order; shards without an IP yet are left out, so the list
/// only ever names reachable sandboxes.
pub fn render(ips: &[Option<&str>], form: EndpointsForm) -> String {
    let known = ips
        .iter()
        .enumerate()
        .filter_map(|(i, ip)| ip.map(|ip| (i, ip)));
    match form {
        EndpointsForm::Objects => {
            let list: Vec<Endpoint<'_>> = known
                .map(|(i, ip)| Endpoint {
                    sandbox_id: i.to_string(),
                    ip,
                })
                .collect();
            serde_json::to_string(&list)
        }
        EndpointsForm::Ips => serde_json::to_string(&known.map(|(_, ip)| ip).collect::<Vec<_>>()),
    }
    .expect("strings always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_forms_in_shard_order() {
        let ips = [Some("127.1.1.2"), None, Some("127.1.1.4")];
        assert_eq!(
            render(&ips, EndpointsForm::Objects),
            r#"[{"sandbox_id":"0","ip":"127.1.1.2"},{"sandbox_id":"2","ip":"127.1.1.4"}]"#
        );
        assert_eq!(
            render(&ips, EndpointsForm::Ips),
            r#"["127.1.1.2","127.1.1.4"]"#
        );
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn auto_gives_opensandbox_server_batches_ip_strings_and_everyone_else_objects() {
        let server = labels(&[(
            OPENSANDBOX_SERVER_LABEL,
            "0b7e7a9c-5b0e-4a43-9d4e-1f0f6c3f2a11",
        )]);
        let kubectl = labels(&[("app", "rl"), ("opensandbox.io/other", "x")]);
        assert_eq!(
            EndpointsFormat::Auto.for_labels(&server),
            EndpointsForm::Ips
        );
        assert_eq!(
            EndpointsFormat::Auto.for_labels(&kubectl),
            EndpointsForm::Objects
        );
        assert_eq!(
            EndpointsFormat::Auto.for_labels(&BTreeMap::new()),
            EndpointsForm::Objects
        );
        assert_eq!(EndpointsFormat::default(), EndpointsFormat::Auto);
    }

    #[test]
    fn the_flag_forces_one_form_for_every_batch() {
        let server = labels(&[(OPENSANDBOX_SERVER_LABEL, "id")]);
        for batch in [&server, &BTreeMap::new()] {
            assert_eq!(
                EndpointsFormat::Objects.for_labels(batch),
                EndpointsForm::Objects
            );
            assert_eq!(EndpointsFormat::Ips.for_labels(batch), EndpointsForm::Ips);
        }
    }

    #[test]
    fn an_opensandbox_server_batch_reads_as_the_server_parses_it() {
        // The server: json.loads(annotation)[0], used as a host.
        let value = render(
            &[Some("127.1.1.6")],
            EndpointsFormat::Auto.for_labels(&labels(&[(OPENSANDBOX_SERVER_LABEL, "id")])),
        );
        let parsed: Vec<String> = serde_json::from_str(&value).unwrap();
        assert_eq!(parsed[0], "127.1.1.6");
    }
}
