//! The `sandbox.opensandbox.io/endpoints` annotation.

use serde::Serialize;

/// How the endpoints annotation is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointsFormat {
    /// `[{"sandbox_id":"0","ip":"..."}, ...]`, as the spec shows.
    #[default]
    Objects,
    /// `["ip0", "ip1", ...]`, the plain list OpenSandbox's server reads.
    Ips,
}

#[derive(Serialize)]
struct Endpoint<'a> {
    sandbox_id: String,
    ip: &'a str,
}

/// The annotation value for shards in order; shards without an IP yet are left out, so the list
/// only ever names reachable sandboxes.
pub fn render(ips: &[Option<&str>], format: EndpointsFormat) -> String {
    let known = ips
        .iter()
        .enumerate()
        .filter_map(|(i, ip)| ip.map(|ip| (i, ip)));
    match format {
        EndpointsFormat::Objects => {
            let list: Vec<Endpoint<'_>> = known
                .map(|(i, ip)| Endpoint {
                    sandbox_id: i.to_string(),
                    ip,
                })
                .collect();
            serde_json::to_string(&list)
        }
        EndpointsFormat::Ips => serde_json::to_string(&known.map(|(_, ip)| ip).collect::<Vec<_>>()),
    }
    .expect("strings always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_formats_in_shard_order() {
        let ips = [Some("127.1.1.2"), None, Some("127.1.1.4")];
        assert_eq!(
            render(&ips, EndpointsFormat::Objects),
            r#"[{"sandbox_id":"0","ip":"127.1.1.2"},{"sandbox_id":"2","ip":"127.1.1.4"}]"#
        );
        assert_eq!(
            render(&ips, EndpointsFormat::Ips),
            r#"["127.1.1.2","127.1.1.4"]"#
        );
    }
}
