//! Manifests the tests share, built in one place.

use sandbox_domain::api::{GROUP, VERSION};

/// A Pool manifest: one `sandbox` container and the given capacity.
pub struct PoolYaml {
    name: String,
    image: String,
    capacity: [i64; 4],
    annotations: Vec<(String, String)>,
    /// Further `spec` fields, as YAML at the spec's indentation (two spaces).
    extra_spec: String,
}

/// A Pool named `name` with `bufferMin, bufferMax, poolMin, poolMax` = `capacity`.
pub fn pool(name: &str, capacity: [i64; 4]) -> PoolYaml {
    PoolYaml {
        name: name.into(),
        image: "opensandbox/code-interpreter:v1.0.1".into(),
        capacity,
        annotations: Vec::new(),
        extra_spec: String::new(),
    }
}

impl PoolYaml {
    pub fn image(mut self, image: &str) -> Self {
        self.image = image.into();
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.into(), value.into()));
        self
    }

    /// `spec.recycleStrategy.type`.
    pub fn recycle(self, strategy: &str) -> Self {
        self.spec_field(&format!("recycleStrategy:\n  type: {strategy}"))
    }

    /// Adds a field of `spec` (YAML, e.g. `"scaleStrategy:\n  maxUnavailable: 1"`).
    pub fn spec_field(mut self, yaml: &str) -> Self {
        for line in yaml.lines() {
            self.extra_spec.push_str(&format!("  {line}\n"));
        }
        self
    }

    pub fn yaml(&self) -> String {
        let [buffer_min, buffer_max, pool_min, pool_max] = self.capacity;
        let annotations = if self.annotations.is_empty() {
            String::new()
        } else {
            let lines: String = self
                .annotations
                .iter()
                .map(|(k, v)| format!("    {k}: {}\n", serde_json::Value::from(v.as_str())))
                .collect();
            format!("  annotations:\n{lines}")
        };
        format!(
            "apiVersion: {GROUP}/{VERSION}\nkind: Pool\nmetadata:\n  name: {name}\n{annotations}spec:\n  template:\n    spec:\n      containers:\n      - name: sandbox\n        image: {image}\n  capacitySpec:\n    bufferMin: {buffer_min}\n    bufferMax: {buffer_max}\n    poolMin: {pool_min}\n    poolMax: {pool_max}\n{extra}",
            extra = self.extra_spec,
            name = self.name,
            image = self.image,
        )
    }
}
