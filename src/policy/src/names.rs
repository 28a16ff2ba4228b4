//! The annotation and label names through which objects select policies and ConfigMaps carry them.

/// Label (value `"true"`) on a ConfigMap in the controller's namespace that holds a custom policy:
/// binaryData `policy.wasm`, optional data `settings.json`. The ConfigMap's name is the policy's.
pub const LABEL_POLICY: &str = "policy.sandbox.opensandbox.io/policy";
/// Annotation on a policy ConfigMap pinning the component's sha256 (hex); a mismatch keeps the
/// revision from loading.
pub const ANNOTATION_POLICY_SHA256: &str = "policy.sandbox.opensandbox.io/sha256";
/// Key of the component in a policy ConfigMap's binaryData.
pub const POLICY_CONFIGMAP_WASM_KEY: &str = "policy.wasm";
/// Key of the settings JSON in a policy ConfigMap's data.
pub const POLICY_CONFIGMAP_SETTINGS_KEY: &str = "settings.json";
