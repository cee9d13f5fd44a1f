//! The `UpstreamPolicy` custom resource (`detour.dev/v1alpha1`). Owned by the operator work.

/// The CRD as YAML, as `detour crd` prints it.
pub fn crd_yaml() -> String {
    String::from("# UpstreamPolicy CRD: not generated yet\n")
}
