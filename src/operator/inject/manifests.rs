//! `detour inject`: the sidecar added to the pod template of every workload of a multi-document
//! YAML stream, the rest of each document kept as the user wrote it.

use std::fmt;

use serde_json::Value;

use super::{inject_pod, yaml, Error, Settings, Skip};

/// What `detour inject` did with one object.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `Deployment web`
    pub object: String,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    Injected,
    Skipped(Skip),
    /// A kind without a pod template.
    NotAWorkload,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.outcome {
            Outcome::Injected => write!(f, "{}: injected", self.object),
            Outcome::Skipped(skip) => write!(f, "{}: skipped: {skip}", self.object),
            Outcome::NotAWorkload => write!(f, "{}: no pod template, unchanged", self.object),
        }
    }
}

/// `detour inject`: every YAML document of `input` with the sidecar added to its pod template
/// (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob,
/// and the items of a `List`); other kinds unchanged.
pub fn inject_manifests(input: &str, s: &Settings) -> Result<String, Error> {
    inject_manifests_with_report(input, s).map(|(out, _)| out)
}

/// [`inject_manifests`], with what happened to each object.
pub fn inject_manifests_with_report(
    input: &str,
    s: &Settings,
) -> Result<(String, Vec<Report>), Error> {
    s.validate()?;
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (index, doc) in yaml::documents(input) {
        let doc = doc.map_err(|error| Error::Yaml { index, error })?;
        if doc.is_null() {
            continue; // an empty document (a stray `---`, only comments)
        }
        let mut json = doc
            .to_json()
            .map_err(|problem| Error::NotAnObject { index, problem })?;
        let changed = inject_object(&mut json, index, s, &mut reports)?;
        let doc = if changed {
            yaml::in_order_of(Some(&doc), json)
        } else {
            doc
        };
        out.push(
            yaml::to_string(&doc).map_err(|yaml::Unsupported(what)| Error::NotAnObject {
                index,
                problem: format!("{what} has no place in a Kubernetes object"),
            })?,
        );
    }
    Ok((out.join("---\n"), reports))
}

/// What a document says it is: `apiVersion`'s group, `kind`, and `Kind name` for messages.
struct Identity {
    group: String,
    kind: String,
    object: String,
}

/// Injects the pod template of one object (or of each item of a List); true when it changed.
fn inject_object(
    obj: &mut Value,
    index: usize,
    s: &Settings,
    reports: &mut Vec<Report>,
) -> Result<bool, Error> {
    let id = identify(obj, index)?;
    let wrap = |error: Error| Error::Document {
        index,
        object: id.object.clone(),
        error: Box::new(error),
    };
    if id.group.is_empty() && id.kind == "List" {
        return inject_list(obj, index, s, reports).map_err(|e| match e {
            e @ Error::Malformed { .. } => wrap(e),
            other => other,
        });
    }
    let Some(path) = pod_template_path(&id.group, &id.kind) else {
        reports.push(Report {
            object: id.object,
            outcome: Outcome::NotAWorkload,
        });
        return Ok(false);
    };
    let (pod, prefix) = pod_template(obj, path).map_err(wrap)?;
    let outcome = inject_template(pod, &prefix, s).map_err(wrap)?;
    reports.push(Report {
        object: id.object,
        outcome,
    });
    Ok(outcome == Outcome::Injected)
}

/// A Kubernetes object has a non-empty `apiVersion` and `kind`.
fn identify(obj: &Value, index: usize) -> Result<Identity, Error> {
    let not_an_object = |problem: String| Error::NotAnObject { index, problem };
    let map = obj.as_object().ok_or_else(|| {
        not_an_object(format!(
            "expected a mapping with apiVersion and kind, found {}",
            json_type(obj)
        ))
    })?;
    let field = |key: &str| match map.get(key) {
        Some(Value::String(v)) if !v.is_empty() => Ok(v.clone()),
        Some(_) => Err(not_an_object(format!("{key} must be a non-empty string"))),
        None => Err(not_an_object(format!("{key} is missing"))),
    };
    let (api_version, kind) = (field("apiVersion")?, field("kind")?);
    let name = obj
        .pointer("/metadata/name")
        .or_else(|| obj.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("(no name)");
    Ok(Identity {
        group: api_version
            .rsplit_once('/')
            .map_or("", |(g, _)| g)
            .to_string(),
        object: format!("{kind} {name}"),
        kind,
    })
}

/// The items of a `List`, each injected as a document of its own.
fn inject_list(
    list: &mut Value,
    index: usize,
    s: &Settings,
    reports: &mut Vec<Report>,
) -> Result<bool, Error> {
    let items = match list.get_mut("items") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => return Ok(false),
        Some(_) => return Err(Error::malformed("items", "must be a list")),
    };
    let mut changed = false;
    for (i, item) in items.iter_mut().enumerate() {
        changed |= inject_object(item, index, s, reports).map_err(|e| match e {
            Error::NotAnObject { index, problem } => Error::NotAnObject {
                index,
                problem: format!("items[{i}]: {problem}"),
            },
            other => other,
        })?;
    }
    Ok(changed)
}

/// Where the pod template sits in a workload kind; `None` for kinds without one.
fn pod_template_path(group: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("", "ReplicationController")
        | ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// The pod template at `path`, and its field path prefix for messages (`spec.template.`).
fn pod_template<'a>(
    obj: &'a mut Value,
    path: &[&str],
) -> Result<(&'a mut serde_json::Map<String, Value>, String), Error> {
    let mut prefix = String::new();
    let mut pod = obj;
    for key in path {
        prefix.push_str(key);
        prefix.push('.');
        let field = prefix.trim_end_matches('.');
        pod = match pod.get_mut(*key) {
            Some(v @ Value::Object(_)) => v,
            None | Some(Value::Null) => return Err(Error::malformed(field, "missing")),
            Some(_) => return Err(Error::malformed(field, "must be an object")),
        };
    }
    let pod = pod
        .as_object_mut()
        .ok_or_else(|| Error::malformed(prefix.trim_end_matches('.'), "must be an object"))?;
    Ok((pod, prefix))
}

/// Runs [`inject_pod`] on a template's metadata and spec, writing them back when injected.
fn inject_template(
    pod: &mut serde_json::Map<String, Value>,
    prefix: &str,
    s: &Settings,
) -> Result<Outcome, Error> {
    let mut meta = pod.get("metadata").cloned().unwrap_or(Value::Null);
    let mut spec = pod.get("spec").cloned().unwrap_or(Value::Null);
    match inject_pod(&mut meta, &mut spec, s).map_err(|e| e.under(prefix))? {
        None => {
            pod.insert("metadata".into(), meta);
            pod.insert("spec".into(), spec);
            Ok(Outcome::Injected)
        }
        Some(skip) => Ok(Outcome::Skipped(skip)),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::operator::inject::CONTAINER;

    #[test]
    fn manifests_keep_the_users_key_order() {
        let input = "kind: Pod\napiVersion: v1\nspec:\n  volumes: []\n  containers:\n  - image: web:1\n    name: app\nmetadata:\n  name: p\n";
        let out = inject_manifests(input, &Settings::default()).unwrap();
        let top: Vec<&str> = out.lines().filter(|l| !l.starts_with([' ', '-'])).collect();
        assert_eq!(top, ["kind: Pod", "apiVersion: v1", "spec:", "metadata:"]);
        let app = out.find("  - image: web:1\n    name: app\n");
        assert!(app.is_some(), "{out}");
        assert!(out.contains("  - name: detour\n"), "{out}");
    }

    #[test]
    fn lists_have_their_items_injected() {
        let input = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": {"containers": [{"name": "app", "image": "x"}]}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}]}"#;
        let (out, reports) = inject_manifests_with_report(input, &Settings::default()).unwrap();
        let out = yaml::parse(&out).unwrap().to_json().unwrap();
        assert_eq!(
            out["items"][0]["spec"]["initContainers"][0]["name"],
            CONTAINER
        );
        assert_eq!(
            out["items"][1],
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}})
        );
        assert_eq!(
            reports.iter().map(|r| r.outcome).collect::<Vec<_>>(),
            [Outcome::Injected, Outcome::NotAWorkload]
        );
        let err = inject_manifests(
            r#"{"apiVersion": "v1", "kind": "List", "items": [3]}"#,
            &Settings::default(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "document 1: not a Kubernetes object: items[0]: expected a mapping with apiVersion and kind, found a number");
    }
}
