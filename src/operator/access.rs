//! What the sidecars of a namespace may read: a Role and RoleBinding (both `detour-sidecar`)
//! that let the namespace's service accounts `get`/`list`/`watch` only the ConfigMap
//! `detour-config` (`resourceNames`; a list/watch is then allowed only with the field selector
//! `metadata.name=detour-config`, which is what `--config-source kubernetes` sends). Kept in
//! every namespace with policies, removed with the last policy. Nothing else is granted.

use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    Api, Client,
};
use serde_json::{json, Value};

use super::{
    reconcile::{Error, MANAGED_BY, MANAGER},
    ApiError,
};
use crate::config::CONFIG_MAP;

/// Name of the Role and of the RoleBinding.
pub const SIDECAR_ACCESS: &str = "detour-sidecar";

/// The Role: read the one ConfigMap.
pub fn role(ns: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {
            "name": SIDECAR_ACCESS,
            "namespace": ns,
            "labels": { MANAGED_BY.0: MANAGED_BY.1 },
        },
        "rules": [{
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [CONFIG_MAP],
            "verbs": ["get", "list", "watch"],
        }],
    })
}

/// The RoleBinding: every service account of the namespace (the pods' own, whichever they use).
pub fn role_binding(ns: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": SIDECAR_ACCESS,
            "namespace": ns,
            "labels": { MANAGED_BY.0: MANAGED_BY.1 },
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": SIDECAR_ACCESS,
        },
        "subjects": [{
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Group",
            "name": format!("system:serviceaccounts:{ns}"),
        }],
    })
}

/// Makes the Role and the RoleBinding of `ns` what [`role`] and [`role_binding`] say: each is
/// read first and written (server-side apply) only when missing or different, so an operator
/// restart writes nothing.
pub async fn apply(client: &Client, ns: &str) -> Result<(), Error> {
    ensure::<Role>(client, ns, "role", role(ns), |r| {
        serde_json::to_value(&r.rules).ok()
    })
    .await?;
    ensure::<RoleBinding>(client, ns, "rolebinding", role_binding(ns), |b| {
        serde_json::to_value((&b.role_ref, &b.subjects)).ok()
    })
    .await
}

async fn ensure<K>(
    client: &Client,
    ns: &str,
    what: &str,
    desired: Value,
    essence: impl Fn(&K) -> Option<Value>,
) -> Result<(), Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let fail = |action| ApiError::of(action, format!("{what} {ns}/{SIDECAR_ACCESS}"));
    let want: K = serde_json::from_value(desired.clone()).expect("a valid object");
    let current = api.get_opt(SIDECAR_ACCESS).await.map_err(fail("get"))?;
    if current.is_some_and(|c| essence(&c) == essence(&want)) {
        return Ok(());
    }
    api.patch(
        SIDECAR_ACCESS,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await
    .map_err(fail("apply"))?;
    Ok(())
}

/// Deletes the RoleBinding and the Role of `ns` (absent ones are fine).
pub async fn remove(client: &Client, ns: &str) -> Result<(), Error> {
    let gone = |r: Result<(), kube::Error>, what: &str| match r {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => {
            Err(ApiError::of("delete", format!("{what} {ns}/{SIDECAR_ACCESS}"))(source).into())
        }
    };
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    gone(
        bindings
            .delete(SIDECAR_ACCESS, &DeleteParams::default())
            .await
            .map(drop),
        "rolebinding",
    )?;
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    gone(
        roles
            .delete(SIDECAR_ACCESS, &DeleteParams::default())
            .await
            .map(drop),
        "role",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_grants_reading_the_one_config_map_and_nothing_else() {
        let r: Role = serde_json::from_value(role("shop")).unwrap();
        let rules = r.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["configmaps".to_string()][..])
        );
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&[CONFIG_MAP.to_string()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        assert_eq!(rules[0].api_groups.as_deref(), Some(&[String::new()][..]));
    }

    #[test]
    fn the_binding_names_the_service_accounts_of_its_own_namespace() {
        let b: RoleBinding = serde_json::from_value(role_binding("shop")).unwrap();
        let subjects = b.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "Group");
        assert_eq!(subjects[0].name, "system:serviceaccounts:shop");
        assert_eq!(b.role_ref.name, SIDECAR_ACCESS);
        assert_eq!(b.role_ref.kind, "Role");
    }
}
